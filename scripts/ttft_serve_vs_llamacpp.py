"""Time to first token of a ~200-token chat prompt through `headrace serve` (CPU, the embedded GGUF) against
llama.cpp's prefill of the same tokens (llama-cpp-python on the same file, same thread count), interleaved:
one request to the server, then one llama.cpp generation of one token, --iters times, each with a prompt of
its own (no prefix cache on either side: the server's is off by default, llama.cpp is reset before each).

    PYTHONPATH=. python scripts/ttft_serve_vs_llamacpp.py --dtype bfloat16 --cpu-threads 1 --iters 5

Prints both medians and their ratio (the issue's bar: ours <= 1.2x llama.cpp's prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np

from headrace.common.models.source import embedded_gguf_path, resolve_model

WORDS = ("river stone market lantern orchard velvet harbor meadow signal copper winter garden bridge canyon "
         "ribbon summit forest engine quartz pepper marble falcon cobalt willow").split()


def chat_prompt(rng: np.random.Generator, tokenizer, target: int) -> tuple[str, list[int]]:
    """A user message of random words whose templated prompt is `target` tokens (or just over)."""
    words: list[str] = ["Summarise", "this", "list:"]
    while True:
        text = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words)}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= target:
            return " ".join(words), ids
        words.append(str(rng.choice(WORDS)))


def server_ttft(client: httpx.Client, url: str, model: str, content: str) -> tuple[float, int]:
    """Seconds from sending the request to the first streamed token; the prompt's token count."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, prompt_tokens = None, -1
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return first, prompt_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--port", type=int, default=18431)
    args = p.parse_args()
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("", log=lambda *_: None).tokenizer_dir)
    rng = np.random.default_rng(0)
    prompts = [chat_prompt(rng, tokenizer, args.prompt_tokens) for _ in range(args.iters + 1)]
    llm = Llama(model_path=embedded_gguf_path(), n_ctx=512, n_threads=args.cpu_threads,
                n_threads_batch=args.cpu_threads, n_batch=512, verbose=False)
    cmd = [sys.executable, "-c", "import sys; from headrace.cli import main; sys.exit(main())", "serve",
           "--dtype", args.dtype, "--cpu-threads", str(args.cpu_threads), "--max-model-len", "512",
           "--port", str(args.port)]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client() as client:
            for _ in range(600):
                try:
                    if client.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            model = client.get(url + "/v1/models").json()["data"][0]["id"]
            ours, theirs, counts = [], [], set()
            for i, (content, ids) in enumerate(prompts):
                ttft, n = server_ttft(client, url, model, content)
                llm.reset()
                t0 = time.perf_counter()
                next(iter(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)))
                prefill = time.perf_counter() - t0
                if i == 0:
                    continue  # warm-up, both sides
                ours.append(ttft)
                theirs.append(prefill)
                counts.add((n, len(ids)))
                print(f"iter {i}: ours {ttft * 1e3:.1f} ms ({n} prompt tokens), llama.cpp {prefill * 1e3:.1f} ms "
                      f"({len(ids)} tokens), load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"TTFT median: ours {a * 1e3:.1f} ms, llama.cpp prefill {b * 1e3:.1f} ms, ours / llama.cpp = {a / b:.2f}x "
          f"(prompt tokens ours/theirs {sorted(counts)}, {args.cpu_threads} thread(s))")


if __name__ == "__main__":
    main()
