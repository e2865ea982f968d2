"""Offline batch inference in one process, for researchers and `headrace run-batch`.

    llm = LLM()  # the embedded SmolLM2; or LLM("path/to/hf-folder", max_model_len=4096, dtype="bfloat16")
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    print(outs[0].outputs[0].text)

Every prompt goes into one `LLMEngine` at once, so continuous batching runs them together; results come
back in input order. `submit` + `stream_finished` are the streaming form underneath: results as they finish.
`structured_outputs=StructuredOutputs(json=schema)` (or regex, choice, grammar, json_object) constrains the
output as the server's `response_format` / `structured_outputs` do (headrace/structured_outputs.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from headrace.common.config import EngineConfig
from headrace.common.messages import RequestOutput, TokenLogprobs
from headrace.common.sampling_params import SamplingParams
from headrace.engine import LLMEngine
from headrace.structured_outputs import GrammarCache, StructuredOutputs
from headrace.services.tokenizer.text_codec import OutputText, TextCodec

Prompt = str | Sequence[int]
Conversation = list[Mapping[str, Any]]
Constraints = StructuredOutputs | Sequence[StructuredOutputs | None] | None


@dataclass
class CompletionOutput:
    """One of a prompt's n choices."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None  # per output token, when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None
    error: str | None = None


@dataclass
class GenerationOutput:
    """Everything one prompt produced."""

    request_id: str
    prompt: str | None  # the prompt text (a chat prompt as rendered); None when token ids were given
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class _Job:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    choices: list[ChoiceText]
    engine_ids: list[str] = field(default_factory=list)
    pending: int = 0

    def result(self) -> GenerationOutput:
        outputs = []
        for i, c in enumerate(self.choices):
            cumulative = sum(lp.logprob for lp in c.logprobs) if c.logprobs is not None else None
            outputs.append(CompletionOutput(i, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
                                            cumulative, c.error))
        return GenerationOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                                max((c.num_cached_tokens for c in self.choices), default=0))


def engine_config(model: str = "", **engine_kwargs: Any) -> EngineConfig:
    """An EngineConfig from keyword arguments named as the config's fields (dtype, max_model_len,
    max_num_seqs, max_num_batched_tokens, kv_cache_memory, seed, enable_prefix_caching, device,
    attention_backend, ...): the same dataclasses, defaults and validation as `headrace serve`'s flags."""
    return EngineConfig.from_flat(model=model, **engine_kwargs)


class LLM:
    def __init__(self, model: str = "", *, config: EngineConfig | None = None, log=print, **engine_kwargs: Any):
        if config is None:
            config = engine_config(model, **engine_kwargs)
        elif model or engine_kwargs:
            raise TypeError("pass either config or model / engine arguments, not both")
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError("LLM runs the engine in this process (tensor_parallel_size=1); "
                             "use `headrace serve --tensor-parallel-size N` for several GPUs")
        self.engine = LLMEngine(config, log=log)
        self.config = config = self.engine.config  # resolved
        model = config.require_resolved()
        self.codec = TextCodec.load(model.tokenizer_dir, config.model.chat_template, model.max_model_len)
        self.model_name = model.name
        self._jobs: dict[str, _Job] = {}
        self._choice_of: dict[str, tuple[_Job, int]] = {}  # engine request id -> (job, choice index)
        self._next_engine_id = 0
        self._grammars = GrammarCache()

    @classmethod
    def from_config(cls, config: EngineConfig, log=print) -> LLM:
        return cls(config=config, log=log)

    @property
    def tokenizer(self) -> Any:
        return self.codec.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------ the batch API

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, structured_outputs: Constraints = None) -> list[GenerationOutput]:
        """Complete text prompts or token-id prompts; one result per prompt, in input order.
        `structured_outputs`: one constraint for every prompt, or one (or None) per prompt."""
        prompt_list = _prompt_list(prompts)
        encoded = []
        for p in prompt_list:
            if isinstance(p, str):
                encoded.append((self.codec.encode_text(p), p))
            else:
                encoded.append((self.codec.check_ids(p), None))
        return self._run(encoded, _params_list(sampling_params, len(encoded)), use_tqdm,
                         self._grammars.per_prompt(structured_outputs, len(encoded)))

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True, *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             structured_outputs: Constraints = None) -> list[GenerationOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, rendered with the
        model's chat template; one result per conversation, in input order."""
        single = isinstance(messages, Sequence) and bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if single else list(messages)
        encoded = [self.codec.encode_chat(c, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message,
                                          template_kwargs=chat_template_kwargs) for c in conversations]
        return self._run(encoded, _params_list(sampling_params, len(encoded)), use_tqdm,
                         self._grammars.per_prompt(structured_outputs, len(encoded)))

    def _run(self, encoded: list[tuple[list[int], str | None]], params: list[SamplingParams],
             use_tqdm: bool, grammars: list[str | None]) -> list[GenerationOutput]:
        if self._jobs:
            raise RuntimeError("requests from submit() are still pending; drain stream_finished() first")
        try:
            for i, ((ids, text), p, grammar) in enumerate(zip(encoded, params, grammars)):
                self._submit(str(i), ids, p, text, grammar)
            results: list[GenerationOutput | None] = [None] * len(encoded)
            for out in self.stream_finished(use_tqdm):
                results[int(out.request_id)] = out
        except BaseException:  # a refused prompt or an interrupt: leave the engine empty for the next call
            self.abort(list(self._jobs))
            raise
        return results  # type: ignore[return-value]  # every slot is filled once the stream ends

    # ------------------------------------------------------------------ the streaming form

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, structured_outputs: StructuredOutputs | None = None) -> None:
        """Queue one prompt (n choices become n engine requests). Raises ValueError when the engine refuses
        it (duplicate id, prompt longer than the context, more KV than the cache holds, a constraint that is
        not valid or cannot be enforced); nothing is queued."""
        self._submit(request_id, prompt_token_ids, params, prompt, self._grammars.ebnf(structured_outputs))

    def _submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None,
                grammar: str | None) -> None:
        if request_id in self._jobs:
            raise ValueError(f"request id {request_id!r} is already pending")
        job = _Job(request_id, prompt, list(prompt_token_ids), [])
        try:
            for j in range(params.n):
                # Each choice samples on its own stream: a seeded request's choices differ, yet repeat.
                child = params.replace(n=1, seed=None if params.seed is None else params.seed + j)
                engine_id = str(self._next_engine_id)
                self._next_engine_id += 1
                self.engine.add_request(engine_id, job.prompt_token_ids, child, grammar=grammar)
                job.engine_ids.append(engine_id)
                job.choices.append(ChoiceText(self.codec.output_text(child, job.prompt_token_ids)))
        except ValueError:
            self.engine.abort(job.engine_ids)
            raise
        job.pending = len(job.choices)
        self._jobs[request_id] = job
        for j, engine_id in enumerate(job.engine_ids):
            self._choice_of[engine_id] = (job, j)

    def abort(self, request_ids: Sequence[str]) -> None:
        """Drop pending prompts (unknown ids are ignored)."""
        for request_id in request_ids:
            job = self._jobs.pop(request_id, None)
            if job is not None:
                self.engine.abort(job.engine_ids)
                for engine_id in job.engine_ids:
                    self._choice_of.pop(engine_id, None)

    def stream_finished(self, use_tqdm: bool = True) -> Iterator[GenerationOutput]:
        """Step the engine until every submitted prompt is done, yielding each as its last choice finishes."""
        bar = tqdm(total=len(self._jobs), desc="Processed prompts", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, output_tokens = time.perf_counter(), 0
        try:
            while self._jobs:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine idle with {len(self._jobs)} prompts pending")
                for out in self.engine.step():
                    entry = self._choice_of.get(out.req_id)
                    if entry is None:
                        continue
                    job, j = entry
                    if not job.choices[j].add(out):
                        continue
                    del self._choice_of[out.req_id]
                    if not out.finished:  # a stop string ended it; the engine would go on
                        self.engine.abort([out.req_id])
                    job.pending -= 1
                    if job.pending:
                        continue
                    del self._jobs[job.request_id]
                    result = job.result()
                    output_tokens += result.num_output_tokens
                    bar.set_postfix_str(f"output {output_tokens / (time.perf_counter() - start):.1f} tok/s",
                                        refresh=False)
                    bar.update(1)
                    yield result
        finally:
            bar.close()


class ChoiceText:
    """One choice's output as engine steps arrive: token ids, text with stop strings applied, logprobs."""

    def __init__(self, output: OutputText):
        self._output = output
        self._pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if output.wants_logprobs else None
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
        text, stop_string, logprobs = self._output.update(out)
        if self.logprobs is not None and logprobs:
            self.logprobs += logprobs
        self._pieces.append(text)
        if stop_string is not None:
            self._finish("stop", stop_string)
        elif out.finished:
            self._finish(out.finish_reason or "error", out.stop_reason)
            self.error = out.error
        return self.finished

    def _finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt as token ids
    return list(prompts)


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return params
