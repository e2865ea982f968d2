"""Batched token sampler: penalties, min-tokens, temperature, min-p / top-k / top-p, logprobs.

Everything runs on the logits' device for the whole batch at once. The only per-row Python work is
building the input tensors (one pass per step) and formatting logprobs for the rows that asked.

Random sampling uses the exponential (Gumbel-max) trick with noise from a counter-based hash of
(seed, step, token id) instead of a stateful generator: a request's k-th token is always drawn with
the same noise, whatever batch it lands in, and no per-row torch.Generator is needed. On CUDA the draw
is one Triton kernel (kernels/sampling.py) that makes the noise in registers; elsewhere, torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from headrace.common.messages import TopLogprobs
from headrace.common.sampling_params import SamplingParams

# Temperatures below this are treated as greedy (dividing by them would overflow; vLLM does the same).
_GREEDY_EPS = 1e-5

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic; int64 multiply/add wrap).
_U64 = (1 << 64) - 1


def wrap_int64(x: int) -> int:
    """x as the signed int64 of the same low 64 bits (torch has no uint64)."""
    x &= _U64
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = wrap_int64(0x9E3779B97F4A7C15)
_MUL1 = wrap_int64(0xBF58476D1CE4E5B9)
_MUL2 = wrap_int64(0x94D049BB133111EB)


@dataclass
class SamplingRow:
    """What the model runner knows per sampling request. The runner's own token list is shared, not copied:
    prompt and output slices are taken only for rows that need them (penalties), never per step for all."""

    params: SamplingParams
    seed: int  # always set: the engine draws one when the user gave none
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...]
    # Tokens sampled by a step still running on the device, not yet in token_ids (the runner overlaps
    # step t+1's launch with step t): they count toward the output length, which seeds the draws.
    num_pending: int = 0
    # A constrained request's grammar matcher (xgrammar's GrammarMatcher, advanced past every token in
    # token_ids): it fills the row's allowed-token bitmask. None: unconstrained.
    matcher: object | None = None

    @classmethod
    def from_parts(cls, params: SamplingParams, seed: int, prompt_token_ids: list[int],
                   output_token_ids: list[int], eos_token_ids: tuple[int, ...]) -> SamplingRow:
        return cls(params, seed, list(prompt_token_ids) + list(output_token_ids), len(prompt_token_ids),
                   eos_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class SamplingInputs:
    """Per-step sampling tensors on the target device. Optional tensors are None when no row needs them."""

    vocab_size: int
    all_greedy: bool
    # [B] bool; None when all rows are greedy or all random (no mixing needed).
    is_greedy: torch.Tensor | None
    temperature: torch.Tensor | None  # [B] f32, 1.0 on greedy rows; None when all greedy
    seeds: torch.Tensor | None  # [B] i64
    steps: torch.Tensor | None  # [B] i64 = len(output_token_ids)
    min_p: torch.Tensor | None  # [B] f32
    top_k: torch.Tensor | None  # [B] i64, vocab_size where disabled
    max_top_k: int
    top_p: torch.Tensor | None  # [B] f32
    # Penalties (all None when no row has any).
    presence_penalty: torch.Tensor | None  # [B] f32
    frequency_penalty: torch.Tensor | None  # [B] f32
    repetition_penalty: torch.Tensor | None  # [B] f32
    prompt_token_ids: torch.Tensor | None  # [B, Lp] i64 padded with vocab_size; None if no repetition penalty
    output_token_ids: torch.Tensor | None  # [B, Lo] i64 padded with vocab_size
    # Tokens to mask to -inf (min_tokens): [2, N] (row, token) index pairs.
    blocked: torch.Tensor | None
    # Logprobs: per row N (None: not asked) and the batch max (None: no row asked).
    num_logprobs: list[int | None]
    max_num_logprobs: int | None
    # Grammar-constrained rows ([G] i64) and their allowed tokens, one bit per token ([G, ceil(V / 32)] i32,
    # bit v % 32 of word v // 32); None when no row is constrained.
    grammar_rows: torch.Tensor | None = None
    grammar_bitmask: torch.Tensor | None = None

    @property
    def no_penalties(self) -> bool:
        return self.presence_penalty is None

    @property
    def no_top_k_top_p(self) -> bool:
        return self.top_k is None and self.top_p is None


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting for the device: `torch.tensor(data, device=cuda)` copies
    synchronously, which would stall the host until every step already queued has run."""
    host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _pad(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, lists)))
    return to_device([ids + [pad] * (width - len(ids)) for ids in lists], torch.int64, device)


def fill_each_bitmask(matchers: list, bitmask: torch.Tensor) -> None:
    """Row j of `bitmask`: what matchers[j] allows next, one matcher after another."""
    for j, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, j)


def build_sampling_inputs(rows: list[SamplingRow], vocab_size: int, device: torch.device,
                          fill_bitmasks: Callable[[list, torch.Tensor], None] = fill_each_bitmask) -> SamplingInputs:
    """One pass over the rows collecting plain Python lists, then the tensors some row needs, made once.
    `fill_bitmasks(matchers, bitmask)` fills the constrained rows' masks (GrammarRuntime.fill_bitmasks: many at
    once on xgrammar's threads)."""
    columns = _Columns.empty(len(rows), vocab_size)
    for i, row in enumerate(rows):
        columns.add(i, row)
    return columns.to_inputs(device, fill_bitmasks)


@dataclass
class _Columns:
    """build_sampling_inputs' per-row values on the host, one list entry per row, and which options any row
    uses (the tensors of unused options are never made)."""

    vocab_size: int
    greedy: list[bool]
    temperature: list[float]
    seeds: list[int]
    steps: list[int]
    top_k: list[int]  # vocab_size where disabled
    top_p: list[float]
    min_p: list[float]
    presence: list[float]
    frequency: list[float]
    repetition: list[float]
    prompts: list[list[int]]  # only rows with a repetition penalty fill theirs
    outputs: list[list[int]]  # only rows with penalties fill theirs
    blocked_rows: list[int]
    blocked_tokens: list[int]
    num_logprobs: list[int | None]
    matchers: dict[int, object] = field(default_factory=dict)  # row -> grammar matcher
    max_top_k: int = 0
    any_top_p: bool = False
    any_min_p: bool = False
    any_penalty: bool = False
    any_repetition: bool = False

    @classmethod
    def empty(cls, n: int, vocab_size: int) -> _Columns:
        return cls(vocab_size=vocab_size, greedy=[False] * n, temperature=[0.0] * n, seeds=[0] * n, steps=[0] * n,
                   top_k=[vocab_size] * n, top_p=[1.0] * n, min_p=[0.0] * n, presence=[0.0] * n,
                   frequency=[0.0] * n, repetition=[1.0] * n, prompts=[[] for _ in range(n)],
                   outputs=[[] for _ in range(n)], blocked_rows=[], blocked_tokens=[], num_logprobs=[None] * n)

    def add(self, i: int, row: SamplingRow) -> None:
        p = row.params
        num_out = row.num_output_tokens
        greedy = p.temperature < _GREEDY_EPS
        self.greedy[i] = greedy
        self.temperature[i] = 1.0 if greedy else p.temperature
        self.seeds[i] = wrap_int64(row.seed)
        self.steps[i] = num_out
        if not greedy:  # sampling filters only matter for random rows
            self._add_filters(i, p)
        self._add_penalties(i, row)
        if num_out < p.min_tokens:
            self._block_stop_tokens(i, row)
        self.num_logprobs[i] = p.logprobs
        if row.matcher is not None and not row.matcher.is_terminated():
            self.matchers[i] = row.matcher

    def _add_filters(self, i: int, p: SamplingParams) -> None:
        if 0 < p.top_k < self.vocab_size:
            self.top_k[i] = p.top_k
            self.max_top_k = max(self.max_top_k, p.top_k)
        self.top_p[i] = p.top_p
        self.any_top_p |= p.top_p < 1.0
        self.min_p[i] = p.min_p
        self.any_min_p |= p.min_p > 0.0

    def _add_penalties(self, i: int, row: SamplingRow) -> None:
        p = row.params
        self.presence[i], self.frequency[i], self.repetition[i] = (p.presence_penalty, p.frequency_penalty,
                                                                   p.repetition_penalty)
        if p.has_penalties:
            self.any_penalty = True
            self.outputs[i] = row.output_token_ids  # rows without penalties stay empty (all padding): a small tensor
            if p.repetition_penalty != 1.0:
                self.any_repetition = True
                self.prompts[i] = row.prompt_token_ids

    def _block_stop_tokens(self, i: int, row: SamplingRow) -> None:
        """min_tokens not reached: the row's stop tokens (and EOS unless ignored) are masked."""
        p = row.params
        block = p.stop_token_ids if p.ignore_eos else p.stop_token_ids + row.eos_token_ids
        for t in set(block):
            if t < self.vocab_size:
                self.blocked_rows.append(i)
                self.blocked_tokens.append(t)

    def grammar_masks(self, device: torch.device, fill_bitmasks: Callable[[list, torch.Tensor], None]
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows, bitmask) of the constrained rows, filled on the host by their matchers; (None, None) if none."""
        if not self.matchers:
            return None, None
        bitmask = torch.empty(len(self.matchers), (self.vocab_size + 31) // 32, dtype=torch.int32)
        fill_bitmasks(list(self.matchers.values()), bitmask)
        return (to_device(list(self.matchers), torch.int64, device),
                bitmask if device.type != "cuda" else bitmask.pin_memory().to(device, non_blocking=True))

    def to_inputs(self, device: torch.device, fill_bitmasks: Callable[[list, torch.Tensor], None]) -> SamplingInputs:
        V = self.vocab_size
        all_greedy = all(self.greedy)
        mixed = not all_greedy and any(self.greedy)
        asked = [k for k in self.num_logprobs if k is not None]
        pen = self.any_penalty
        grammar_rows, grammar_bitmask = self.grammar_masks(device, fill_bitmasks)
        return SamplingInputs(
            vocab_size=V,
            all_greedy=all_greedy,
            is_greedy=to_device(self.greedy, torch.bool, device) if mixed else None,
            temperature=None if all_greedy else to_device(self.temperature, torch.float32, device),
            seeds=None if all_greedy else to_device(self.seeds, torch.int64, device),
            steps=None if all_greedy else to_device(self.steps, torch.int64, device),
            min_p=to_device(self.min_p, torch.float32, device) if self.any_min_p else None,
            top_k=to_device(self.top_k, torch.int64, device) if self.max_top_k else None,
            max_top_k=self.max_top_k,
            top_p=to_device(self.top_p, torch.float32, device) if self.any_top_p else None,
            presence_penalty=to_device(self.presence, torch.float32, device) if pen else None,
            frequency_penalty=to_device(self.frequency, torch.float32, device) if pen else None,
            repetition_penalty=to_device(self.repetition, torch.float32, device) if pen else None,
            prompt_token_ids=_pad(self.prompts, V, device) if self.any_repetition else None,
            output_token_ids=_pad(self.outputs, V, device) if pen else None,
            blocked=to_device([self.blocked_rows, self.blocked_tokens], torch.int64, device)
            if self.blocked_rows else None,
            num_logprobs=self.num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
            grammar_rows=grammar_rows,
            grammar_bitmask=grammar_bitmask,
        )


# --------------------------------------------------------------------------- counter-based noise


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place on int64. `>>` is arithmetic on int64: mask for a logical shift."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _MUL1
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _MUL2
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed_b, step_b, v).

    kernels/sampling.py generates the same bits in registers (the CUDA path of `_draw`) and keeps a
    torch twin (hash_uniform_ref); tests/kernels/test_sampling.py pins all three together: change them
    together, and note that any change alters every seeded output."""
    # Per-row key from (seed, step), then the v-th output of a splitmix64 stream keyed by it.
    key = _mix64_(seeds + _GAMMA)
    key ^= steps
    key = _mix64_(key * _MUL2 + _GAMMA)
    offs = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * _GAMMA
    z = _mix64_(key[:, None] + offs)
    # High 23 bits -> odd multiples of 2^-24: exact in float32, never 0 or 1.
    hi = ((z >> 41) & ((1 << 23) - 1)).to(torch.float32)
    return hi.mul_(2.0).add_(1.0).mul_(2.0**-24)


# --------------------------------------------------------------------------- logits processing


def apply_grammar_masks_(x: torch.Tensor, inputs: SamplingInputs) -> None:
    """Tokens a constrained row's grammar does not allow next go to -inf, in place; other rows are untouched
    (only the constrained rows are gathered, unpacked and written back)."""
    rows, bits = inputs.grammar_rows, inputs.grammar_bitmask
    if rows is None or bits is None:
        return
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, : x.shape[-1]].bool()
    x[rows] = x[rows].masked_fill(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Repetition / frequency / presence penalties (vLLM / OpenAI semantics). Returns a new tensor."""
    if inputs.no_penalties:
        return logits
    B, V = logits.shape
    out_ids = inputs.output_token_ids
    assert out_ids is not None
    # Token counts in the output; the padding column V is dropped.
    counts = torch.zeros(B, V + 1, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.int32))
    counts = counts[:, :V]
    out_mask = counts > 0
    x = logits
    if inputs.prompt_token_ids is not None:  # repetition penalty: tokens seen in prompt or output
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, inputs.prompt_token_ids, True)
        seen = seen[:, :V] | out_mask
        r = inputs.repetition_penalty[:, None]  # type: ignore[index]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    x = x - inputs.frequency_penalty[:, None] * counts  # type: ignore[index]
    return x - inputs.presence_penalty[:, None] * out_mask  # type: ignore[index]


def _apply_top_k_top_p(x: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    neg_inf = float("-inf")
    if inputs.top_p is None:
        # Top-k only: a partial sort up to the largest k is much cheaper than sorting the vocab.
        assert inputs.top_k is not None
        vals = x.topk(inputs.max_top_k, dim=-1).values
        kth = vals.gather(1, (inputs.top_k.clamp(max=inputs.max_top_k) - 1)[:, None])
        # Disabled rows (k == vocab_size) keep everything.
        kth = kth.masked_fill((inputs.top_k >= inputs.vocab_size)[:, None], neg_inf)
        return x.masked_fill_(x < kth, neg_inf)
    srt, idx = x.sort(dim=-1, descending=True)
    if inputs.top_k is not None:
        kth = srt.gather(1, inputs.top_k[:, None] - 1)
        srt.masked_fill_(srt < kth, neg_inf)
    probs = srt.softmax(dim=-1)
    # Drop a token once the mass strictly before it reaches top_p; the top token has 0 before it, so stays.
    before = probs.cumsum(dim=-1).sub_(probs)
    srt.masked_fill_(before >= inputs.top_p[:, None], neg_inf)
    return torch.empty_like(x).scatter_(1, idx, srt)


def filtered_logits(x: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """x: penalised logits (not modified). The logits a random row draws from: scaled by its temperature, with
    min-p, top-k and top-p applied (-inf outside); a new tensor."""
    assert inputs.temperature is not None
    x = x / inputs.temperature[:, None]
    if inputs.min_p is not None:
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); min_p == 0 gives -inf (keep all).
        thresh = x.amax(dim=-1, keepdim=True) + inputs.min_p[:, None].log()
        x.masked_fill_(x < thresh, float("-inf"))
    if not inputs.no_top_k_top_p:
        x = _apply_top_k_top_p(x, inputs)
    return x


def _draw(filtered: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """filtered: filtered_logits' output, overwritten. Returns [B] ids drawn for every row (greedy rows
    included)."""
    assert inputs.seeds is not None and inputs.steps is not None
    fused = _fused_sampling(filtered.device)
    if fused is not None:
        # The same draw in one kernel: noise made in registers, logits read once (no [B, V] int64 noise).
        return fused.hash_gumbel_argmax(filtered, inputs.seeds, inputs.steps)
    return gumbel_argmax_(filtered, inputs.seeds, inputs.steps)


def gumbel_argmax_(x: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Torch path of the draw, overwriting x ([B, V] float32): [B] argmax_v(x - log(-log u)), u = hash noise.
    argmax(p / q) with q ~ Exp(1)  ==  argmax(logit - log q): same draw, no softmax, no underflow."""
    q = hash_uniform(seeds, steps, x.shape[-1]).log_().neg_()
    return x.sub_(q.log_()).argmax(dim=-1)


def _fused_sampling(device: torch.device):
    """kernels.sampling on CUDA where Triton is importable, else None (the torch path)."""
    return _triton_sampling() if device.type == "cuda" else None


@functools.cache
def _triton_sampling():
    """kernels.sampling, or None where Triton is missing. Imported on first CUDA use only: CPU processes
    never load Triton."""
    try:
        from headrace.kernels import sampling
    except ImportError:
        return None
    return sampling


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: list[TopLogprobs | None] | None  # per row; None when no row asked
    # [B, V] float32: what each row's token was drawn from (Sampler.probabilities), when asked for.
    probabilities: torch.Tensor | None = None


class Sampler:
    @staticmethod
    def warm_up(vocab_size: int, max_batch: int, device: torch.device) -> None:
        """Compile the fused random-sampling kernel's variants before serving (no-op off CUDA)."""
        fused = _fused_sampling(device)
        if fused is not None:
            fused.warm_up(vocab_size, max_batch, device)

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs, with_probabilities: bool = False
                 ) -> SamplerOutput:
        """Each row's token; with_probabilities: also the distributions they were drawn from, from the same
        penalised logits (speculative verification against a draft model needs both)."""
        logits = logits.float()
        # User-facing logprobs come from the raw model distribution (before penalties / temperature).
        raw_lp = logits.log_softmax(dim=-1) if inputs.max_num_logprobs is not None else None
        x = self._penalised(logits, inputs)
        filtered = None if inputs.all_greedy else filtered_logits(x, inputs)
        probs = self._distribution(x, filtered, inputs) if with_probabilities else None  # before the draw
        if filtered is None:
            tokens = x.argmax(dim=-1)
        else:
            tokens = _draw(filtered, inputs)
            if inputs.is_greedy is not None:  # mixed batch: greedy rows take the argmax of the penalised logits
                tokens = torch.where(inputs.is_greedy, x.argmax(dim=-1), tokens)
        return SamplerOutput(tokens, None if raw_lp is None else self._logprobs(raw_lp, tokens, inputs), probs)

    @staticmethod
    def _penalised(logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """float32 logits with min-tokens blocks, grammar masks and penalties applied (the input stays intact)."""
        x = logits
        if inputs.blocked is not None or inputs.grammar_rows is not None:  # out of place: raw logits stay intact
            x = x.clone()
        if inputs.blocked is not None:  # min_tokens
            x[inputs.blocked[0], inputs.blocked[1]] = float("-inf")
        apply_grammar_masks_(x, inputs)
        return apply_penalties(x, inputs)

    def probabilities(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """[B, V] float32: the distribution each row's token is drawn from (what __call__ samples), one-hot at
        the argmax on greedy rows. Speculative decoding with a draft model compares these."""
        x = self._penalised(logits.float(), inputs)
        return self._distribution(x, None if inputs.all_greedy else filtered_logits(x, inputs), inputs)

    @staticmethod
    def _distribution(x: torch.Tensor, filtered: torch.Tensor | None, inputs: SamplingInputs) -> torch.Tensor:
        """probabilities() from the penalised logits x and, unless every row is greedy, filtered_logits(x)."""
        greedy = torch.zeros_like(x).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        if filtered is None:
            return greedy
        probs = filtered.softmax(dim=-1)
        return probs if inputs.is_greedy is None else torch.where(inputs.is_greedy[:, None], greedy, probs)

    @staticmethod
    def _logprobs(
        raw_lp: torch.Tensor, tokens: torch.Tensor, inputs: SamplingInputs
    ) -> list[TopLogprobs | None]:
        n = min(inputs.max_num_logprobs or 0, raw_lp.shape[-1])
        tok_lp = raw_lp.gather(1, tokens[:, None]).squeeze(1).tolist()
        if n > 0:
            top_lp, top_ids = raw_lp.topk(n, dim=-1)
            top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        # Output formatting: slice each row's top-N from the batch top-max.
        result: list[TopLogprobs | None] = []
        for i, k in enumerate(inputs.num_logprobs):
            if k is None:
                result.append(None)
            else:
                ids, lps = (top_ids_l[i][:k], top_lp_l[i][:k]) if k > 0 else ([], [])
                result.append(TopLogprobs(token_logprob=tok_lp[i], top_token_ids=ids, top_logprobs=lps))
        return result
