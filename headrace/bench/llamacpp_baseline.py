"""The llama.cpp baseline of `headrace bench latency --baseline llamacpp`: llama-cpp-python on the same GGUF
file, the same prompts (the same token ids: one vocabulary), greedy, EOS ignored, one sequence at a time
(llama.cpp's own batch-1 path), with as many threads as the engine's worker.

`llama_cpp` is never a dependency: the baseline runs where it is importable and says how to get it where not.
Its iterations run interleaved with the engine's (one of ours, one of llama.cpp's), so on a machine shared
with other work both see the same load and the ratio is meaningful even when the absolute numbers are not.
"""

from __future__ import annotations

import time

from headrace.common.config import EngineConfig


class BaselineUnavailable(RuntimeError):
    pass


def gguf_file(config: EngineConfig) -> str:
    """The GGUF file the engine serves (the embedded default, or a --model ending in .gguf)."""
    from headrace.common.models.source import embedded_gguf_path

    model = config.model.model
    if not model:
        return embedded_gguf_path()
    if model.endswith(".gguf"):
        return model
    raise BaselineUnavailable(f"--baseline llamacpp needs a GGUF model (the embedded default or a .gguf file), "
                              f"not {model!r}")


def load(config: EngineConfig, n_ctx: int, threads: int):
    path = gguf_file(config)
    try:
        from llama_cpp import Llama
    except ImportError:
        raise BaselineUnavailable("--baseline llamacpp needs llama-cpp-python (`pip install llama-cpp-python`, "
                                  "built from source; never a headrace dependency)") from None
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, verbose=False)


def timed_generate(llm, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) of one greedy generation of exactly output_len."""
    t0 = time.perf_counter()
    first = None
    for n, _ in enumerate(llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True),
                          start=1):
        if n == 1:
            first = time.perf_counter() - t0
        if n == output_len:
            break
    return first, time.perf_counter() - t0
