"""Scoring requests checked against generation on a running server, for any model and device (random
weights on a GPU included, where no transformers oracle is at hand).

Greedy generation with `logprobs` gives each output token's logprob as decoded, one token per step (decode
graphs on a GPU). Scoring the same prompt + those tokens with vLLM's `prompt_logprobs` and `max_tokens: 0`
gives them from one prefill (chunked when the server's --max-num-batched-tokens is small, piecewise graphs
on a GPU). The two must agree; the output tokens' ids come from prompt_logprobs too (the rank-1 entry after
a placeholder token), since completions answer with text. Prints the largest difference and PASS or FAIL
against a tolerance (float32: 1e-3; bf16, where decode and prefill round differently: about 0.1).

    headrace serve --model random:llama-3-8b --tokenizer .tok --max-num-batched-tokens 128 --port 8011 &
    python scripts/check_scoring.py --base-url http://127.0.0.1:8011 --tolerance 0.1
"""

from __future__ import annotations

import argparse
import random
import sys

import httpx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--max-token-id", type=int, default=30000, help="prompt token ids are drawn below this")
    args = parser.parse_args()
    http = httpx.Client(base_url=args.base_url, timeout=600)
    model = http.get("/v1/models").json()["data"][0]["id"]
    rng = random.Random(0)
    worst, compared = 0.0, 0
    for i in range(args.prompts):
        prompt = [rng.randrange(1, args.max_token_id) for _ in range(args.prompt_len)]
        generated = _complete(http, model=model, prompt=prompt, max_tokens=args.new_tokens, logprobs=0,
                              ignore_eos=True)["logprobs"]
        ids: list[int] = []
        for _ in range(args.new_tokens):  # the greedy ids, one prefill each
            ids.append(_top_id(_scores(http, model, prompt + ids + [0])[-1]))
        scores = _scores(http, model, prompt + ids)[len(prompt):]
        diffs = []
        for tid, entry, text, lp in zip(ids, scores, generated["tokens"], generated["token_logprobs"]):
            mine = entry[str(tid)]
            if mine["decoded_token"] != text:
                break  # decode and prefill chose differently (a near tie): later contexts differ
            diffs.append(abs(mine["logprob"] - lp))
        worst, compared = max([worst, *diffs]), compared + len(diffs)
        print(f"prompt {i}: {len(diffs)}/{args.new_tokens} tokens agree on the choice, max |decode - prefill| "
              f"logprob {max(diffs, default=0.0):.2e}")
    verdict = "PASS" if worst <= args.tolerance and compared else "FAIL"
    print(f"RESULT scoring vs generation: {compared} tokens, max difference {worst:.2e} "
          f"(tolerance {args.tolerance}) {verdict}")
    return 0 if verdict == "PASS" else 1


def _complete(http: httpx.Client, **body) -> dict:
    r = http.post("/v1/completions", json={"temperature": 0, **body})
    r.raise_for_status()
    return r.json()["choices"][0]


def _scores(http: httpx.Client, model: str, ids: list[int]) -> list[dict | None]:
    return _complete(http, model=model, prompt=ids, max_tokens=0, prompt_logprobs=1)["prompt_logprobs"]


def _top_id(entry: dict) -> int:
    return int(min(entry.items(), key=lambda item: item[1]["rank"])[0])


if __name__ == "__main__":
    sys.exit(main())
