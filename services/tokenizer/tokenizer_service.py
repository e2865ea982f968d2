"""The tokenizer process: one single-threaded loop on its PULL inbox.

In:  api -> GenerateRequest / AbortRequest / TokenizeRequest / DetokenizeRequest
     scheduler -> BatchRequestOutput
Out: scheduler <- TokenizedRequest, AbortRequest (client gone, or a stop string matched)
     api[i] <- BatchTextDelta (one per step per api instance), TextDelta (errors), Tokenize/DetokenizeResponse

Each request's detokenizer state lives here from its GenerateRequest until it finishes, so requests stick to
one tokenizer instance. Bad input fails that request only; the loop never dies of a message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from common import transport
from common.addresses import AddressPlan, address_plan
from common.codec import MessageDecodeError
from common.config import EngineConfig
from common.messages import (
    AbortRequest,
    BatchRequestOutput,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    GenerateRequest,
    Heartbeat,
    RequestOutput,
    Shutdown,
    TextDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobs,
    TopLogprobs,
)
from services.tokenizer.chat import ChatTemplate, validate_messages
from services.tokenizer.detokenizer import IncrementalDetokenizer, TokenTexts
from services.tokenizer.errors import RequestError
from services.tokenizer.loading import chat_template_source, eos_token_ids, load_tokenizer, tokenizer_source

log = logging.getLogger(__name__)

_POLL_MS = 1000  # how often an idle loop checks that its parent is still alive


@dataclass
class _Request:
    api_index: int
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int
    want_logprobs: bool
    prompt_text: str | None  # sent once, on the first delta (echo)
    num_output_tokens: int = 0


class TokenizerService:
    def __init__(self, index: int, tokenizer: Any, plan: AddressPlan, *, chat_template: str | None = None,
                 eos_token_ids: Sequence[int] = (), max_model_len: int | None = None):
        self.index = index
        self.tokenizer = tokenizer
        self.raw = tokenizer.backend_tokenizer  # the Rust tokenizers.Tokenizer behind the HF fast tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        template = chat_template if chat_template is not None else chat_template_source(tokenizer, None)
        self.chat_template = ChatTemplate(template, tokenizer.special_tokens_map) if template else None
        self.token_texts = TokenTexts(self.raw)
        self.requests: dict[str, _Request] = {}

        self.ctx = zmq.Context()
        self.inbox = transport.pull_socket(self.ctx, plan.tokenizer_inbox[index])
        self.to_scheduler = transport.push_socket(self.ctx, plan.scheduler_inbox)
        self.to_api = [transport.push_socket(self.ctx, ep) for ep in plan.api_inbox]
        self.running = True
        self.handlers: dict[type, Callable[[Any], None]] = {
            GenerateRequest: self.on_generate,
            BatchRequestOutput: self.on_outputs,
            AbortRequest: self.on_abort,
            TokenizeRequest: self.on_tokenize,
            DetokenizeRequest: self.on_detokenize,
            Heartbeat: lambda _: None,
            Shutdown: self.on_shutdown,
        }

    # ------------------------------------------------------------------ loop

    def run(self, parent_pid: int | None = None) -> None:
        while self.running:
            try:
                msg = transport.recv(self.inbox, _POLL_MS)
            except MessageDecodeError as e:
                log.warning("tokenizer %d: dropped a malformed message: %s", self.index, e)
                continue
            if msg is None:
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.error("tokenizer %d: parent process died; exiting", self.index)
                    break
                continue
            handler = self.handlers.get(type(msg))
            if handler is None:
                log.warning("tokenizer %d: unexpected %s", self.index, type(msg).__name__)
                continue
            try:
                handler(msg)
            except Exception:  # a bug on one message must not take every other request down
                log.exception("tokenizer %d: failed on %s", self.index, type(msg).__name__)

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def on_shutdown(self, msg: Shutdown) -> None:
        log.info("tokenizer %d: shutdown (%s)", self.index, msg.reason)
        self.running = False

    # ------------------------------------------------------------------ api -> scheduler

    def on_generate(self, req: GenerateRequest) -> None:
        if not self._api_ok(req.api_index, req.req_id):
            return
        try:
            if req.req_id in self.requests:
                raise RequestError(f"duplicate request id {req.req_id!r}", "request_id")
            ids, text = self._prompt(req.prompt, req.prompt_token_ids, req.messages, req.add_special_tokens,
                                     req.add_generation_prompt, req.continue_final_message,
                                     req.chat_template_kwargs)
            self._check_length(ids, req.sampling_params.max_tokens, "messages" if req.messages else "prompt")
        except Exception as e:
            self._reply(req.api_index, TextDelta(req.req_id, finished=True, finish_reason="error",
                                                 error=self._error(e, req.req_id)))
            return
        params = req.sampling_params
        prompt_text = None
        if req.echo:
            prompt_text = text if text is not None else self.tokenizer.decode(ids)
        self.requests[req.req_id] = _Request(
            api_index=req.api_index,
            detokenizer=IncrementalDetokenizer(self.raw, params, ids),
            num_prompt_tokens=len(ids),
            want_logprobs=params.logprobs is not None,
            prompt_text=prompt_text,
        )
        transport.send(self.to_scheduler, TokenizedRequest(
            req_id=req.req_id, prompt_token_ids=ids, sampling_params=params, tokenizer_index=self.index,
            eos_token_ids=self.eos_token_ids, arrival_time=req.arrival_time))

    def on_abort(self, msg: AbortRequest) -> None:
        self.requests.pop(msg.req_id, None)
        transport.send(self.to_scheduler, msg)

    def _prompt(self, prompt: str | None, token_ids: list[int] | None, messages: list[dict[str, object]] | None,
                add_special_tokens: bool, add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: dict[str, object] | None = None) -> tuple[list[int], str | None]:
        """(token ids, prompt text where known) from exactly one of the three prompt forms."""
        if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
            raise RequestError("exactly one of prompt, prompt token ids or messages must be given.", "prompt")
        if messages is not None:
            if self.chat_template is None:
                raise RequestError("this model has no chat template; the server needs --chat-template.",
                                   "messages")
            text = self.chat_template.render(validate_messages(messages), add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, kwargs=template_kwargs)
            # The template already wrote BOS and friends; adding them again would double them.
            return self.tokenizer.encode(text, add_special_tokens=False), text
        if token_ids is not None:
            self._check_ids(token_ids, "prompt")
            return list(token_ids), None
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string.", "prompt")
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise RequestError("prompt must not be empty.", "prompt")
        return ids, prompt

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise RequestError("token ids must not be empty.", param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError(f"token ids must be in [0, {self.vocab_size}).", param)

    def _check_length(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        if self.max_model_len is None:
            return  # the scheduler checks against the model's own context length
        if len(ids) >= self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                               f"has {len(ids)} tokens.", param)
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise RequestError(f"max_tokens ({max_tokens}) plus the prompt ({len(ids)} tokens) exceeds the "
                               f"maximum context length of {self.max_model_len}.", "max_tokens")

    # ------------------------------------------------------------------ scheduler -> api

    def on_outputs(self, batch: BatchRequestOutput) -> None:
        by_api: dict[int, list[TextDelta]] = {}
        for out in batch.outputs:
            state = self.requests.get(out.req_id)
            if state is None:
                continue  # aborted, or already finished by a stop string; the scheduler had it in flight
            try:
                delta = self._delta(out, state)
            except Exception as e:  # fail this request, keep the batch
                log.exception("tokenizer %d: detokenizing %s failed", self.index, out.req_id)
                delta = TextDelta(out.req_id, finished=True, finish_reason="error",
                                  error=ErrorInfo(f"detokenization failed: {e}", "InternalServerError", None, 500))
                transport.send(self.to_scheduler, AbortRequest(out.req_id))
            if delta.finished:
                del self.requests[out.req_id]
            by_api.setdefault(state.api_index, []).append(delta)
        for api_index, deltas in by_api.items():
            self._reply(api_index, BatchTextDelta(deltas))

    def _delta(self, out: RequestOutput, state: _Request) -> TextDelta:
        # The scheduler finishes with "stop" only on a stop token (EOS or stop_token_ids); stop strings are ours.
        stop_token = out.finished and out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        text, stop_string = state.detokenizer.update(out.new_token_ids, finished=out.finished,
                                                     stop_token=stop_token)
        finished, finish_reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        if stop_string is not None:
            finished, finish_reason, stop_reason = True, "stop", stop_string
            if not out.finished:
                transport.send(self.to_scheduler, AbortRequest(out.req_id))
        state.num_output_tokens += len(out.new_token_ids)
        error = None
        if out.error:
            error = ErrorInfo(out.error, "InternalServerError", None, 500)
            finished, finish_reason = True, finish_reason or "error"
        prompt_text, state.prompt_text = state.prompt_text, None
        return TextDelta(
            req_id=out.req_id, text=text, token_ids=out.new_token_ids,
            logprobs=self._logprobs(out.new_token_ids, out.new_logprobs) if state.want_logprobs else None,
            finished=finished, finish_reason=finish_reason, stop_reason=stop_reason,
            num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
            num_cached_tokens=out.num_cached_tokens, prompt_text=prompt_text, error=error)

    def _logprobs(self, token_ids: list[int], logprobs: list[TopLogprobs] | None) -> list[TokenLogprobs] | None:
        if not logprobs:
            return None
        texts = self.token_texts(token_ids)
        return [TokenLogprobs(token=t, logprob=lp.token_logprob, top_token_ids=lp.top_token_ids,
                              top_tokens=self.token_texts(lp.top_token_ids), top_logprobs=lp.top_logprobs)
                for t, lp in zip(texts, logprobs)]

    # ------------------------------------------------------------------ /tokenize, /detokenize

    def on_tokenize(self, req: TokenizeRequest) -> None:
        if not self._api_ok(req.api_index, req.req_id):
            return
        try:
            ids, _ = self._prompt(req.prompt, None, req.messages, req.add_special_tokens, req.add_generation_prompt)
            strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        except Exception as e:
            self._reply(req.api_index, TokenizeResponse(req.req_id, error=self._error(e, req.req_id)))
            return
        self._reply(req.api_index, TokenizeResponse(req.req_id, ids, strs))

    def on_detokenize(self, req: DetokenizeRequest) -> None:
        if not self._api_ok(req.api_index, req.req_id):
            return
        try:
            self._check_ids(req.token_ids, "tokens")
            text = self.tokenizer.decode(req.token_ids)
        except Exception as e:
            self._reply(req.api_index, DetokenizeResponse(req.req_id, error=self._error(e, req.req_id)))
            return
        self._reply(req.api_index, DetokenizeResponse(req.req_id, text))

    # ------------------------------------------------------------------ helpers

    def _api_ok(self, api_index: int, req_id: str) -> bool:
        if isinstance(api_index, int) and 0 <= api_index < len(self.to_api):
            return True
        log.warning("tokenizer %d: request %s names unknown api instance %r", self.index, req_id, api_index)
        return False

    def _error(self, e: Exception, req_id: str) -> ErrorInfo:
        """The request's fault (400 with the param) or ours (500, logged); either way the api gets an answer."""
        if isinstance(e, RequestError):
            return e.info()
        log.exception("tokenizer %d: request %s failed", self.index, req_id)
        return ErrorInfo(f"tokenizer failed: {type(e).__name__}: {e}", "InternalServerError", None, 500)

    def _reply(self, api_index: int, msg: Any) -> None:
        transport.send(self.to_api[api_index], msg)


def main(config_dict: dict[str, Any], index: int) -> None:
    """Process entrypoint for the launcher: `main(config.to_dict(), index)`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tokenizer-{index} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    tokenizer = load_tokenizer(config.model)
    folder, _ = tokenizer_source(config.model)
    service = TokenizerService(
        index, tokenizer, address_plan(config.server),
        chat_template=chat_template_source(tokenizer, config.model.chat_template),
        eos_token_ids=eos_token_ids(tokenizer, folder), max_model_len=config.model.max_model_len)
    log.info("tokenizer %d ready", index)
    try:
        service.run(parent_pid=os.getppid())
    finally:
        service.close()
