"""Benchmark request sets, seeded and shared by every `headrace bench` command.

    sample_requests(name, num_prompts, tokenizer, input_len, output_len, seed, dataset_path=None,
                    range_ratio=0.0, as_token_ids=False) -> list[BenchRequest]

`name` is one of DATASET_NAMES:
- "random": prompts of `input_len` tokens (± `range_ratio`), built from random vocabulary ids decoded to
  text and re-encoded until the text is that many tokens long; every request asks for `output_len` tokens
  (± `range_ratio`).
- "sharegpt-like": a length mix whose means match ShareGPT's (~200 prompt, ~180 output tokens), drawn from
  clipped log-normals, so no download is needed; `input_len`/`output_len` are ignored. Prompts are random
  text as above.
- "jsonl": `dataset_path`, one JSON object per line: {"prompt": str | list[int], "output_len": int
  (optional; `output_len` when absent)}. Lines are shuffled with the seed and cycled to `num_prompts`.

`tokenizer` is a transformers tokenizer (`encode`, `decode`, `vocab_size`, `added_tokens_decoder`).
The same arguments give the same requests on any machine. With `as_token_ids=True` prompts are token-id
lists of exactly `prompt_len` ids (for engine-direct benchmarks that skip tokenization).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

DATASET_NAMES = ("random", "sharegpt-like", "jsonl")

# ShareGPT's length profile (means) and the bounds vLLM's ShareGPT loader keeps (4..1024 tokens each).
SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN = 200.0, 180.0
SHAREGPT_INPUT_SIGMA, SHAREGPT_OUTPUT_SIGMA = 1.1, 0.9  # log-space spread: long-tailed like real chats
SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN = 4, 1024


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens in the prompt as this tokenizer counts them (no special tokens added)
    output_len: int  # max_tokens to ask for


def sample_requests(name: str, num_prompts: int, tokenizer, input_len: int = 1024, output_len: int = 128,
                    seed: int = 0, dataset_path: str | None = None, range_ratio: float = 0.0,
                    as_token_ids: bool = False) -> list[BenchRequest]:
    """`num_prompts` requests of dataset `name` (see the module docstring)."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    if name == "random":
        in_lens = _uniform_lengths(rng, input_len, range_ratio, num_prompts)
        out_lens = _uniform_lengths(rng, output_len, range_ratio, num_prompts)
    elif name == "sharegpt-like":
        in_lens = _clipped_lognormal_lengths(rng, SHAREGPT_INPUT_MEAN, SHAREGPT_INPUT_SIGMA, num_prompts)
        out_lens = _clipped_lognormal_lengths(rng, SHAREGPT_OUTPUT_MEAN, SHAREGPT_OUTPUT_SIGMA, num_prompts)
    elif name == "jsonl":
        if not dataset_path:
            raise ValueError("dataset 'jsonl' needs --dataset-path (one {\"prompt\": ...} object per line)")
        return _jsonl_requests(dataset_path, num_prompts, tokenizer, output_len, rng, as_token_ids)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    vocab = _plain_vocab(tokenizer)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        if as_token_ids:
            requests.append(BenchRequest(rng.choice(vocab, int(n_in)).tolist(), int(n_in), int(n_out)))
        else:
            text, n = random_text(tokenizer, rng, int(n_in), vocab)
            requests.append(BenchRequest(text, n, int(n_out)))
    return requests


def random_text(tokenizer, rng: np.random.Generator, num_tokens: int, vocab: np.ndarray) -> tuple[str, int]:
    """Text of random vocabulary tokens that re-encodes to `num_tokens` tokens (or as near as a few
    rounds of truncating/padding get); returns (text, its real token count)."""
    ids = rng.choice(vocab, num_tokens).tolist()
    for _ in range(10):
        # Decoded neighbours can merge into fewer tokens or split into more; fix the count and retry.
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        got = tokenizer.encode(text, add_special_tokens=False)
        if len(got) == num_tokens:
            return text, num_tokens
        ids = got[:num_tokens] if len(got) > num_tokens else got + rng.choice(vocab, num_tokens - len(got)).tolist()
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _plain_vocab(tokenizer) -> np.ndarray:
    """Vocabulary ids that are ordinary text: no special or added tokens (their text would be read as
    control tokens by the server)."""
    excluded = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return np.array([i for i in range(tokenizer.vocab_size) if i not in excluded], dtype=np.int64)


def _uniform_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    if mean < 1:
        raise ValueError(f"lengths must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, math.floor(mean * (1 - range_ratio))), math.ceil(mean * (1 + range_ratio))
    return rng.integers(low, high + 1, size=n)


def _clipped_lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    mu = _lognormal_mu_for_clipped_mean(mean, sigma, SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN)
    draws = rng.lognormal(mu, sigma, size=n)
    return np.clip(np.rint(draws), SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN).astype(np.int64)


def _lognormal_mu_for_clipped_mean(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The log-space location whose log-normal, clipped to [lo, hi], has exactly `mean` (bisection on the
    closed form), so clipping the tails does not drag the mix's mean away from the target."""

    def phi(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def clipped_mean(mu: float) -> float:
        a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
        inside = math.exp(mu + sigma * sigma / 2) * (phi(b - sigma) - phi(a - sigma))
        return lo * phi(a) + inside + hi * (1.0 - phi(b))

    low, high = math.log(lo) - 5 * sigma, math.log(hi) + 5 * sigma
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if clipped_mean(mid) < mean else (low, mid)
    return (low + high) / 2


def _jsonl_requests(path: str, num_prompts: int, tokenizer, default_output_len: int, rng: np.random.Generator,
                    as_token_ids: bool) -> list[BenchRequest]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str | list[int], \"output_len\": int}}")
            rows.append((prompt, int(row.get("output_len") or default_output_len)))
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    order = rng.permutation(len(rows))
    requests = []
    for i in range(num_prompts):
        prompt, out_len = rows[order[i % len(rows)]]
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=False)
        if as_token_ids:
            prompt = list(ids)
        elif isinstance(prompt, list):
            prompt = tokenizer.decode(prompt, clean_up_tokenization_spaces=False)
        requests.append(BenchRequest(prompt, len(ids), out_len))
    return requests


def add_dataset_args(p):
    """The dataset flags every benchmark shares, spelled as vLLM's (an argparse parser or group owner)."""
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=DATASET_NAMES)
    d.add_argument("--dataset-path", default=None, help='for jsonl: one {"prompt": ..., "output_len": N} per line')
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths are uniform in [len*(1-r), len*(1+r)]")
    d.add_argument("--input-len", type=int, default=None, help="same as --random-input-len")
    d.add_argument("--output-len", type=int, default=None,
                   help="same as --random-output-len (also the jsonl default output length)")
    return d


def resolve_length_aliases(args) -> None:
    """Fold --input-len / --output-len into --random-input-len / --random-output-len."""
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.output_len

