"""Validated request bodies -> SamplingParams and the prompts to run, or a 400 naming the field at fault.

Range checks live in common.sampling_params (the engine and the offline API reject the same values with the
same messages); this module adds what only the HTTP API knows: the model name check, `max_n`, how each
endpoint spells its fields, and how `n` fans out into one engine request per choice.
"""

from __future__ import annotations

from typing import Any

from headrace.common.sampling_params import SamplingParams, SamplingParamsError
from headrace.services.api.errors import ApiError, model_not_found
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingBody


# One prompt of a completion request: text, or token ids.
Prompt = str | list[int]


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise model_not_found(requested)


def completion_params(req: CompletionRequest, max_n: int) -> SamplingParams:
    """Echo with logprobs and vLLM's prompt_logprobs both ask the engine for the prompt's logprobs (the more
    of the two top-N). max_tokens 0 scores the prompt alone: the engine generates one token, which the
    response drops (CompletionShape.score_only)."""
    asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    max_tokens = req.max_tokens
    if max_tokens == 0:
        if not req.echo and req.prompt_logprobs is None:
            raise ApiError(400, "max_tokens 0 needs echo or prompt_logprobs (it scores the prompt only).",
                           param="max_tokens")
        if req.min_tokens > 0:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens (0).", param="min_tokens")
        max_tokens = 1
    return _params(req, max_n, max_tokens=max_tokens, logprobs=req.logprobs,
                   prompt_logprobs=max(asked) if asked else None)


def chat_params(req: ChatCompletionRequest, max_n: int) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _params(req, max_n, max_tokens=max_tokens, logprobs=logprobs)


def _params(req: SamplingBody, max_n: int, *, max_tokens: int | None, logprobs: int | None,
            prompt_logprobs: int | None = None) -> SamplingParams:
    if req.n > max_n:
        raise ApiError(400, f"n must be at most {max_n}, got {req.n}.", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    values: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, seed=req.seed,
        stop=tuple(stop), stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )
    # Absent (or null) knobs keep SamplingParams' defaults, which are OpenAI's.
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if (value := getattr(req, name)) is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except SamplingParamsError as e:
        raise ApiError(400, str(e), param=e.param) from None


def choice_params(params: SamplingParams, k: int) -> SamplingParams:
    """The params of choice k of n: one sequence each, and distinct seeds so seeded choices still differ."""
    seed = params.seed
    if seed is not None and k:
        seed = (seed + k + 2**63) % 2**64 - 2**63  # stays an int64 at the top of the range
    return params.replace(n=1, seed=seed)


def completion_prompts(req: CompletionRequest) -> list[Prompt]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise ApiError(400, "prompt must not be empty.", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, list) and not p:
            raise ApiError(400, "a token-id prompt must not be empty.", param=f"prompt.[{i}]")
    return prompts
