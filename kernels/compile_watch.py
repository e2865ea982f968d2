"""Report Triton compiles that happen after start-up.

Compiling a kernel variant takes about a second, and on the serving path every request waits for it. The
attention backends compile every variant serving reaches during warm-up; once serving, a compile is a bug
(a new specialisation of some argument), so the worker logs each one with the kernel's signature.
"""

from __future__ import annotations

from typing import Callable


def watch_compiles(report: Callable[[str], None]) -> bool:
    """From now on, call report(description) before Triton compiles (or loads from its disk cache) a
    kernel variant this process has not run yet. Returns False where this Triton has no such hook."""
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4, or none at all
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook"):
        return False

    def hook(*, repr: str, key=None, **_) -> bool:
        # The key holds the argument specialisations (dtype, alignment / ==1 class): what differs from the
        # variants compiled before is what made this compile.
        name = repr.split("(", 1)[0]
        report(f"{name} {' '.join(str(key).split())[:1500]}")
        return False  # a true value would skip the compile

    runtime.jit_cache_hook = hook
    return True
