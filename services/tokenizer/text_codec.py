"""Text in and out for one model: prompts to checked token ids (text, ids or chat messages), and each
request's output text (incremental detokenization, stop strings, logprob texts).

The tokenizer process runs these behind its sockets (tokenizer_service.py); the offline API (headrace.llm,
headrace.run_batch) calls them in its own process, so a prompt renders, fails and ends the same either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from headrace.common.messages import PromptLogprobs, PromptLogprobsText, RequestOutput, TokenLogprobs, TopLogprobs
from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.chat import ChatTemplate, validate_messages
from headrace.services.tokenizer.detokenizer import IncrementalDetokenizer, TokenTexts
from headrace.services.tokenizer.errors import RequestError
from headrace.services.tokenizer.loading import chat_template_source, load_tokenizer


class TextCodec:
    def __init__(self, tokenizer: Any, chat_template: str | None = None, max_model_len: int | None = None):
        """`chat_template`: Jinja source (None: the tokenizer's own); `max_model_len` None leaves lengths to
        the scheduler."""
        self.tokenizer = tokenizer
        self.raw = tokenizer.backend_tokenizer  # the Rust tokenizers.Tokenizer behind the HF fast tokenizer
        self.vocab_size = len(tokenizer)
        self.max_model_len = max_model_len
        template = chat_template if chat_template is not None else chat_template_source(tokenizer, None)
        self.chat_template = ChatTemplate(template, tokenizer.special_tokens_map) if template else None
        self.token_texts = TokenTexts(self.raw)
        self.user_text = UserText(self.raw)

    @classmethod
    def load(cls, tokenizer_dir: str, chat_template_path: str | None, max_model_len: int | None) -> TextCodec:
        """The model's tokenizer; `chat_template_path` (--chat-template) overrides its own template."""
        tokenizer = load_tokenizer(tokenizer_dir)
        return cls(tokenizer, chat_template_source(tokenizer, chat_template_path), max_model_len)

    # ------------------------------------------------------------------ prompts in

    def encode(self, prompt: Any = None, token_ids: Any = None, messages: Any = None, *,
               add_special_tokens: bool = True, add_generation_prompt: bool = True,
               continue_final_message: bool = False,
               template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], str | None]:
        """(token ids, prompt text where known) from exactly one of the three prompt forms."""
        if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
            raise RequestError("exactly one of prompt, prompt token ids or messages must be given.", "prompt")
        if messages is not None:
            return self.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, template_kwargs=template_kwargs)
        if token_ids is not None:
            return self.check_ids(token_ids), None
        return self.encode_text(prompt, add_special_tokens), prompt

    def encode_text(self, prompt: Any, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string.", param)
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise RequestError("prompt must not be empty.", param)
        return ids

    def encode_chat(self, messages: Any, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], str]:
        if self.chat_template is None:
            raise RequestError("this model has no chat template; the server needs --chat-template.", "messages")
        escaped, literals = self.user_text.escape(validate_messages(messages))
        text = self.chat_template.render(escaped, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, kwargs=template_kwargs)
        # The template already wrote BOS and friends; adding them again would double them.
        if not literals:
            return self.tokenizer.encode(text, add_special_tokens=False), text
        return self.user_text.encode(text, literals, self.tokenizer), self.user_text.restore(text, literals)

    def check_ids(self, ids: Any, param: str = "prompt") -> list[int]:
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not ids:
            raise RequestError("token ids must be a non-empty list of integers.", param)
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"token ids must be integers in [0, {vocab}).", param)
        return list(ids)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt") -> None:
        """The OpenAI endpoints' rule: the prompt, and the prompt with max_tokens, must fit the context."""
        limit = self.max_model_len
        if limit is None:
            return
        if num_prompt_tokens >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens; the prompt has "
                               f"{num_prompt_tokens} tokens.", param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise RequestError(f"max_tokens ({max_tokens}) plus the prompt ({num_prompt_tokens} tokens) exceeds the "
                               f"maximum context length of {limit}.", "max_tokens")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    # ------------------------------------------------------------------ text out

    def prompt_logprobs_text(self, prompt_token_ids: list[int], scores: PromptLogprobs) -> PromptLogprobsText:
        """A prompt's logprobs with the text of its tokens and of each position's top tokens."""
        return PromptLogprobsText(prompt_token_ids, self.token_texts(prompt_token_ids), scores,
                                  self.token_texts(scores.top_token_ids))

    def output_text(self, params: SamplingParams, prompt_token_ids: Sequence[int]) -> OutputText:
        """The output state of one request (one choice) generated from `prompt_token_ids`."""
        return OutputText(IncrementalDetokenizer(self.raw, params, prompt_token_ids),
                          self.token_texts if params.logprobs is not None else None)


class TextUpdate(NamedTuple):
    text: str  # new text (may be "" while a character or a possible stop string is pending)
    stop_string: str | None  # the stop string that matched: the request is done, whatever the engine says
    logprobs: list[TokenLogprobs] | None  # parallel to the output's new tokens, when the request asked


class OutputText:
    """One request's output text as its engine outputs arrive."""

    def __init__(self, detokenizer: IncrementalDetokenizer, token_texts: TokenTexts | None):
        self._detokenizer = detokenizer
        self._token_texts = token_texts  # None: logprobs were not asked for

    @property
    def wants_logprobs(self) -> bool:
        return self._token_texts is not None

    def update(self, out: RequestOutput) -> TextUpdate:
        # The scheduler finishes with "stop" only on a stop token (EOS or stop_token_ids); stop strings are ours.
        stop_token = out.finished and out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        if len(out.new_token_ids) > 1 and self._detokenizer.has_stop_strings:
            return self._update_token_by_token(out, stop_token)
        text, stop_string = self._detokenizer.update(out.new_token_ids, finished=out.finished, stop_token=stop_token)
        return TextUpdate(text, stop_string, self._logprobs(out.new_token_ids, out.new_logprobs))

    def _update_token_by_token(self, out: RequestOutput, stop_token: bool) -> TextUpdate:
        """Several tokens in one output (speculative decoding) under stop strings: the tokens after the one that
        completes a stop string are not the request's output, so they are cut from `out` (its token ids and
        logprobs, which the usage counts read), as they would never have been sampled one token at a time."""
        ids, texts = out.new_token_ids, []
        for i, token_id in enumerate(ids):
            last = i == len(ids) - 1
            text, stop_string = self._detokenizer.update([token_id], finished=out.finished and last,
                                                         stop_token=stop_token and last)
            texts.append(text)
            if stop_string is not None:
                del ids[i + 1:]
                if out.new_logprobs:
                    del out.new_logprobs[i + 1:]
                return TextUpdate("".join(texts), stop_string, self._logprobs(ids, out.new_logprobs))
        return TextUpdate("".join(texts), None, self._logprobs(ids, out.new_logprobs))

    def _logprobs(self, token_ids: list[int], logprobs: list[TopLogprobs] | None) -> list[TokenLogprobs] | None:
        if self._token_texts is None or not logprobs:
            return None
        texts = self._token_texts(token_ids)
        return [TokenLogprobs(token=t, logprob=lp.token_logprob, top_token_ids=lp.top_token_ids,
                              top_tokens=self._token_texts(lp.top_token_ids), top_logprobs=lp.top_logprobs)
                for t, lp in zip(texts, logprobs)]


class UserText:
    """Special-token text typed into a chat message stays text.

    A template's own markers (`<|im_start|>`) must become control tokens, but the same characters inside a
    user's message must not, or a user could close their turn and open a system one. Messages are scanned
    for special-token strings; each occurrence is swapped for a placeholder of private-use characters before
    rendering, the rendered prompt is tokenized between placeholders as usual, and each placeholder's
    literal is tokenized as plain text. Messages without such strings take the ordinary path unchanged.
    """

    _PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")

    def __init__(self, raw: Any):
        specials = [t.content for t in raw.get_added_tokens_decoder().values() if t.special]
        self._specials = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) \
            if specials else None
        self._plain = type(raw).from_str(raw.to_str())  # a copy whose special tokens encode as text
        self._plain.encode_special_tokens = True

    def escape(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Messages with every special-token string in their text swapped for a numbered placeholder."""
        literals: list[str] = []
        if self._specials is None:
            return messages, literals

        def swap(m: re.Match) -> str:
            literals.append(m.group(0))
            return f"\ue000{len(literals) - 1}\ue001"

        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and self._specials.search(content):
                message = {**message, "content": self._specials.sub(swap, content)}
            out.append(message)
        return out, literals

    def encode(self, text: str, literals: list[str], tokenizer: Any) -> list[int]:
        pieces = self._PLACEHOLDER.split(text)  # text, index, text, index, ..., text
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self._plain.encode(literals[int(piece)], add_special_tokens=False).ids
            elif piece:
                ids += tokenizer.encode(piece, add_special_tokens=False)
        return ids

    def restore(self, text: str, literals: list[str]) -> str:
        return self._PLACEHOLDER.sub(lambda m: literals[int(m.group(1))], text)
