"""--reasoning-parser: a thinking model's <think>...</think> text returned as `reasoning_content`, apart from
the answer's `content`.

`deepseek_r1`: the template opens <think> in the prompt, so the output is reasoning until </think> (all of it
if </think> never comes). `qwen3`: reasoning only when the output opens with <think> (thinking can be off).
"""

from __future__ import annotations

_OPEN, _CLOSE = "<think>", "</think>"


def split_reasoning(parser: str, text: str, final: bool = True) -> tuple[str, str]:
    """(reasoning, content) of the output so far. Mid-stream (`final` false), a tag still being written is
    held back from both, so text streamed once never has to be taken back."""
    body = text.lstrip()
    opened = body.startswith(_OPEN)
    if not final and not opened and _OPEN.startswith(body):
        return "", ""  # maybe the start of <think>
    if opened:
        body = body[len(_OPEN):]
    elif parser == "qwen3":
        return "", text
    else:
        body = text
    end = body.find(_CLOSE)
    if end >= 0:
        return body[:end], body[end + len(_CLOSE):].lstrip("\n")
    if not final:
        body = body[: len(body) - _partial_suffix(body, _CLOSE)]
    return body, ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
