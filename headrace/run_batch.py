"""`headrace run-batch`: an OpenAI Batch API input file through the in-process engine, offline.

Input, one JSON object a line: {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": <the endpoint's request body>}. Every valid line goes into one engine at once (continuous batching);
each result is written the moment its request finishes, one flushed line at a time, as OpenAI's batch output:

    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": ...},
     "error": null}

A line that is not a batch request at all (bad JSON, missing fields, unknown url) gets "response": null and
"error": {"code", "message"}; a request the endpoint would refuse (bad body, bad sampling params, too long) gets
the endpoint's 400 answer in "response" and the same "error". A bad line never stops the file.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from pydantic import ValidationError

from headrace.common.config import EngineConfig
from headrace.common.messages import TokenLogprobs
from headrace.common.sampling_params import SamplingParams
from headrace.llm import LLM, CompletionOutput, GenerationOutput
from headrace.services.api.errors import ApiError, from_validation_errors
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest
from headrace.services.api.sampling import chat_params, completion_params, completion_prompts
from headrace.services.tokenizer.errors import RequestError

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI-compatible servers clamp to this


class LineError(ValueError):
    """The line is not a batch request (it never reaches an endpoint): `code` names what is wrong."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id


# --------------------------------------------------------------------------- request body -> sampling params


def parse_body(body: Mapping[str, Any], chat: bool, max_n: int = 16
               ) -> tuple[CompletionRequest | ChatCompletionRequest, SamplingParams]:
    """Validate a completion / chat body with the API server's own models and sampling rules (one copy
    of them for both paths). Raises RequestError naming the field at fault."""
    if body.get("stream"):
        raise RequestError("stream is not supported in batch requests.", "stream")
    try:
        if chat:
            req = ChatCompletionRequest.model_validate(body)
            return req, chat_params(req, max_n)
        req = CompletionRequest.model_validate(body)
        params = completion_params(req, max_n)
        if params.prompt_logprobs is not None:  # the offline engine returns no prompt logprobs yet
            raise RequestError("scoring requests (echo with logprobs, prompt_logprobs, max_tokens 0) are served "
                               "by `headrace serve` only.", "prompt_logprobs" if req.prompt_logprobs else "echo")
        return req, params
    except ValidationError as e:
        err = from_validation_errors(e.errors())
        raise RequestError(err.message, err.param) from None
    except ApiError as e:
        raise RequestError(e.message, e.param) from None


def sampling_params_from_body(body: Mapping[str, Any], chat: bool, max_n: int = 16) -> SamplingParams:
    """The OpenAI completion / chat body's sampling fields (plus vLLM's extras) as SamplingParams."""
    return parse_body(body, chat, max_n)[1]


# --------------------------------------------------------------------------- one line


@dataclass
class _Line:
    custom_id: str
    url: str
    body: dict[str, Any]
    params: SamplingParams | None = None
    echo: bool = False
    prompts: list[tuple[list[int], str | None]] = field(default_factory=list)
    results: list[GenerationOutput | None] = field(default_factory=list)
    pending: int = 0


def parse_line(raw: bytes | str, seen_ids: set[str]) -> _Line:
    """Check the batch envelope; raises LineError (carrying the custom_id when it is readable)."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LineError("invalid_json", f"the line is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_request", "the line must be a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_required_parameter", "custom_id must be a non-empty string.")
    if custom_id in seen_ids:
        raise LineError("duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line.", custom_id)
    seen_ids.add(custom_id)
    if obj.get("method") != "POST":
        raise LineError("invalid_method", f"method must be \"POST\", got {json.dumps(obj.get('method'))}.",
                        custom_id)
    if obj.get("url") not in ENDPOINTS:
        raise LineError("invalid_url", f"url must be one of {', '.join(ENDPOINTS)}, got {json.dumps(obj.get('url'))}.",
                        custom_id)
    if not isinstance(obj.get("body"), dict):
        raise LineError("missing_required_parameter", "body must be a JSON object.", custom_id)
    return _Line(custom_id, obj["url"], obj["body"])


def _prepare(line: _Line, llm: LLM) -> None:
    """Sampling params and token ids for every prompt of the line; raises RequestError (an HTTP 400)."""
    chat = line.url == CHAT
    req, line.params = parse_body(line.body, chat, llm.config.server.max_n)
    if chat:
        ids, text = llm.codec.encode_chat(
            [m.to_wire() for m in req.messages], add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs)
        line.prompts = [(ids, text)]
    else:
        add_special = line.body.get("add_special_tokens", True) is not False
        line.echo = req.echo
        line.prompts = []
        try:
            prompts = completion_prompts(req)
        except ApiError as e:
            raise RequestError(e.message, e.param) from None
        for p in prompts:
            if isinstance(p, str):
                line.prompts.append((llm.codec.encode_text(p, add_special), p))
            else:
                ids = llm.codec.check_ids(p)
                line.prompts.append((ids, llm.codec.decode(ids) if line.echo else None))
    for ids, _ in line.prompts:
        llm.codec.check_length(len(ids), line.params.max_tokens, "messages" if chat else "prompt")


# --------------------------------------------------------------------------- OpenAI response bodies


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def _completion_logprobs(c: CompletionOutput) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    offsets, offset = [], 0
    for lp in c.logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in c.logprobs],
        "token_logprobs": [_lp(lp.logprob) for lp in c.logprobs],
        "top_logprobs": [{lp.token: _lp(lp.logprob)} | {t: _lp(v) for t, v in zip(lp.top_tokens, lp.top_logprobs)}
                         for lp in c.logprobs],
        "text_offset": offsets,
    }


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}


def _chat_logprobs(logprobs: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [_chat_token(lp.token, lp.logprob)
                        | {"top_logprobs": [_chat_token(t, v) for t, v in zip(lp.top_tokens, lp.top_logprobs)]}
                        for lp in logprobs]}


def response_body(line: _Line, model_name: str) -> dict[str, Any]:
    """The completion / chat.completion object the endpoint would have returned, usage included."""
    chat = line.url == CHAT
    results = [r for r in line.results if r is not None]  # every prompt's, once the line is done
    n = line.params.n if line.params else 1
    choices = []
    for k, result in enumerate(results):
        for c in result.outputs:
            choice: dict[str, Any] = {"index": k * n + c.index}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                choice["logprobs"] = _chat_logprobs(c.logprobs)
            else:
                choice["text"] = (result.prompt or "") + c.text if line.echo else c.text
                choice["logprobs"] = _completion_logprobs(c)
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason
            choices.append(choice)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    completion_tokens = sum(r.num_output_tokens for r in results)
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _record(custom_id: str | None, response: dict[str, Any] | None, error: dict[str, str] | None) -> dict[str, Any]:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response, "error": error}


def _ok_record(line: _Line, model_name: str) -> dict[str, Any]:
    return _record(line.custom_id, {"status_code": 200, "request_id": "req_" + uuid.uuid4().hex,
                                    "body": response_body(line, model_name)}, None)


def _http_error_record(custom_id: str, message: str, param: str | None, status: int) -> dict[str, Any]:
    """The endpoint's error answer (as the API server writes it) in `response`, and the same in `error`."""
    kind, code = ("BadRequestError", "invalid_request_error") if status == 400 else ("InternalServerError",
                                                                                     "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return _record(custom_id, {"status_code": status, "request_id": "req_" + uuid.uuid4().hex, "body": body},
                   {"code": code, "message": message})


# --------------------------------------------------------------------------- the file


@dataclass
class BatchSummary:
    total: int = 0
    succeeded: int = 0
    failed: int = 0


class _Writer:
    def __init__(self, out: IO[str], summary: BatchSummary):
        self.out, self.summary = out, summary

    def write(self, record: dict[str, Any]) -> None:
        ok = record["error"] is None
        self.summary.succeeded += ok
        self.summary.failed += not ok
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()  # a reader (or a crash) sees every finished request, line-complete


def process_batch(llm: LLM, lines: Iterable[bytes | str], out: IO[str], use_tqdm: bool = True) -> BatchSummary:
    """Run every request of `lines` through `llm`, writing each result to `out` as it finishes."""
    summary = BatchSummary()
    writer = _Writer(out, summary)
    seen: set[str] = set()
    by_job: dict[str, tuple[_Line, int]] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) are not requests
        summary.total += 1
        try:
            line = parse_line(raw, seen)
        except LineError as e:
            writer.write(_record(e.custom_id, None, {"code": e.code, "message": f"line {number}: {e}"}))
            continue
        job_ids: list[str] = []
        try:
            _prepare(line, llm)
            for k, (ids, text) in enumerate(line.prompts):
                job_id = f"{number}:{k}"
                llm.submit(job_id, ids, line.params, prompt=text)  # ValueError: the engine could never run it
                job_ids.append(job_id)
        except Exception as e:  # this line's fault (400), or ours on this line only (500)
            llm.abort(job_ids)
            status = e.code if isinstance(e, RequestError) else 400 if isinstance(e, ValueError) else 500
            writer.write(_http_error_record(line.custom_id, str(e), getattr(e, "param", None), status))
            continue
        for k, job_id in enumerate(job_ids):
            by_job[job_id] = (line, k)
        line.results = [None] * len(job_ids)
        line.pending = len(job_ids)
    for result in llm.stream_finished(use_tqdm):
        line, k = by_job.pop(result.request_id)
        line.results[k] = result
        line.pending -= 1
        if line.pending:
            continue
        failed = [c for r in line.results if r for c in r.outputs if c.finish_reason == "error"]
        if failed:
            writer.write(_http_error_record(line.custom_id, failed[0].error or "the request failed", None, 500))
        else:
            writer.write(_ok_record(line, llm.model_name))
    return summary


def run_batch(config: EngineConfig, input_file: str, output_file: str) -> int:
    """`headrace run-batch -i IN -o OUT`: 0 once the file is processed (per-line errors are in the output);
    1 when the input cannot be read or the output cannot be written (checked before the model loads)."""
    if not os.path.isfile(input_file):
        print(f"headrace run-batch: no input file at {input_file!r}", file=sys.stderr)
        return 1
    try:
        src = open(input_file, "rb")
    except OSError as e:
        print(f"headrace run-batch: cannot read {input_file!r}: {e}", file=sys.stderr)
        return 1
    with src:
        try:
            dst = open(output_file, "w", encoding="utf-8")
        except OSError as e:
            print(f"headrace run-batch: cannot write {output_file!r}: {e}", file=sys.stderr)
            return 1
        with dst:
            llm = LLM.from_config(config, log=lambda *a: print(*a, file=sys.stderr))
            started = time.perf_counter()
            summary = process_batch(llm, src, dst)
    print(f"headrace run-batch: {summary.total} requests, {summary.succeeded} succeeded, {summary.failed} failed "
          f"in {time.perf_counter() - started:.1f} s -> {output_file}", file=sys.stderr)
    return 0
