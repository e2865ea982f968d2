"""Text in and out for the in-process engine: a thin adapter over the tokenizer service's pieces.

The served pipeline does this work in the tokenizer process; offline, `LLM` and `run-batch` do it in their
own process with the same parts (tokenizer loading, the sandboxed chat template, the incremental detokenizer
with stop strings), so prompts render and outputs end exactly as they would through the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from headrace.common.config import ModelConfig
from headrace.common.messages import RequestOutput, TokenLogprobs
from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.chat import ChatTemplate, validate_messages
from headrace.services.tokenizer.detokenizer import IncrementalDetokenizer, TokenTexts
from headrace.services.tokenizer.errors import RequestError
from headrace.services.tokenizer.loading import chat_template_source, load_tokenizer


class PromptCodec:
    """Prompts to token ids (text, ids or chat messages), and the per-choice output builders."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.raw = tokenizer.backend_tokenizer  # the Rust tokenizer the incremental detokenizer steps
        self.vocab_size = len(tokenizer)
        template = chat_template if chat_template is not None else chat_template_source(tokenizer, None)
        self.chat_template = ChatTemplate(template, tokenizer.special_tokens_map) if template else None
        self.token_texts = TokenTexts(self.raw)

    @classmethod
    def load(cls, model: ModelConfig, tokenizer_dir: str) -> PromptCodec:
        """`tokenizer_dir`: the HF folder the model loader resolved (a .gguf was already converted into it)."""
        tokenizer = load_tokenizer(dataclasses.replace(model, tokenizer=model.tokenizer or tokenizer_dir))
        return cls(tokenizer, chat_template_source(tokenizer, model.chat_template))

    def encode_text(self, prompt: Any, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string.", param)
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise RequestError("prompt must not be empty.", param)
        return ids

    def check_ids(self, ids: Any, param: str = "prompt") -> list[int]:
        if not isinstance(ids, Sequence) or not ids:
            raise RequestError("token ids must be a non-empty list of integers.", param)
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"token ids must be integers in [0, {self.vocab_size}).", param)
        return list(ids)

    def encode_chat(self, messages: Any, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], str]:
        if self.chat_template is None:
            raise RequestError("this model has no chat template; pass a chat_template file.", "messages")
        text = self.chat_template.render(validate_messages(messages), add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, kwargs=template_kwargs)
        # The template already wrote BOS and friends; adding them again would double them.
        return self.tokenizer.encode(text, add_special_tokens=False), text

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def new_choice(self, params: SamplingParams, prompt_token_ids: Sequence[int]) -> ChoiceText:
        return ChoiceText(IncrementalDetokenizer(self.raw, params, prompt_token_ids),
                          self.token_texts if params.logprobs is not None else None)


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                         param: str = "prompt") -> None:
    """The OpenAI endpoints' rule (as the tokenizer service applies it): the prompt and max_tokens must fit."""
    if num_prompt_tokens >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{num_prompt_tokens} tokens.", param)
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(f"max_tokens ({max_tokens}) plus the prompt ({num_prompt_tokens} tokens) exceeds the "
                           f"maximum context length of {max_model_len}.", "max_tokens")


class ChoiceText:
    """One choice's output as engine steps arrive: token ids, text with stop strings applied, logprobs."""

    def __init__(self, detokenizer: IncrementalDetokenizer, token_texts: TokenTexts | None):
        self._detokenizer = detokenizer
        self._token_texts = token_texts  # None: logprobs were not asked for
        self._pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if token_texts is not None else None
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.num_cached_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def add(self, out: RequestOutput) -> bool:
        """Apply one step's output; True when this choice is done. A stop string can end a choice the engine
        still runs: the caller must then abort its engine request."""
        self.num_cached_tokens = out.num_cached_tokens
        self.token_ids += out.new_token_ids
        if self.logprobs is not None and out.new_logprobs:
            texts = self._token_texts(out.new_token_ids)
            self.logprobs += [TokenLogprobs(token=t, logprob=lp.token_logprob, top_token_ids=lp.top_token_ids,
                                            top_tokens=self._token_texts(lp.top_token_ids),
                                            top_logprobs=lp.top_logprobs)
                              for t, lp in zip(texts, out.new_logprobs)]
        # The scheduler finishes with "stop" only on a stop token (EOS or stop_token_ids); stop strings are ours.
        stop_token = out.finished and out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        text, stop_string = self._detokenizer.update(out.new_token_ids, finished=out.finished, stop_token=stop_token)
        self._pieces.append(text)
        if stop_string is not None:
            self._finish("stop", stop_string)
        elif out.finished:
            self._finish(out.finish_reason or "error", out.stop_reason)
            self.error = out.error
        return self.finished

    def _finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason
