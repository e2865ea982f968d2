"""The wire protocol: every message that crosses a process boundary, one small typed class per kind, in the
order a request meets them:

    api -> tokenizer          GenerateRequest, AbortRequest, TokenizeRequest, DetokenizeRequest
    tokenizer -> scheduler    TokenizedRequest, AbortRequest
    scheduler -> gpu_worker   StepPlan (new requests in full, running ones as ids + new block ids)
    gpu_worker -> scheduler   StepResult, WorkerReady, WorkerError
    scheduler -> tokenizer    BatchRequestOutput (RequestOutput per request)
    tokenizer -> api          BatchTextDelta (TextDelta per request), TokenizeResponse, DetokenizeResponse
    scheduler -> api          EngineStats
    control                   Heartbeat, Shutdown, WorkerFailed

Integer-id lists are declared as `TokenIds` or `BlockIds`; the codec (common.codec) packs both as int32
bytes on the wire. A class with a `TAG` is a top-level message; the others travel inside one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from headrace.common.sampling_params import SamplingParams

TokenIds = list[int]  # token ids
BlockIds = list[int]  # physical KV-cache block ids


# --------------------------------------------------------------------------- api -> tokenizer


@dataclass
class GrammarSpec:
    """What a constrained request's output must match, as the client wrote it. The tokenizer checks it and
    turns it into one EBNF grammar (services/tokenizer/grammar.py).

    kind: "json_schema" (source: the schema as JSON text), "json_object" (any JSON object; source ""),
    "regex", "choice" (source: a JSON array of the allowed strings) or "grammar" (EBNF / GBNF text).
    """

    kind: str
    source: str
    # The request field it came from ("response_format", "guided_regex", "tool_choice", ...), named in errors.
    param: str = ""


@dataclass
class GenerateRequest:
    """One sequence to generate. Exactly one of prompt / prompt_token_ids / messages is set.

    The api fans `n > 1` out into separate requests before this point. The tokenizer answers on the socket
    the request came in on, so the request needs no return address.
    """

    TAG: ClassVar[str] = "generate_request"

    req_id: str
    sampling_params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: TokenIds | None = None
    # OpenAI chat messages (validated and rendered by the tokenizer's chat template).
    messages: list[dict[str, object]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, object] | None = None
    # Return the prompt text on the first TextDelta (completions `echo`).
    echo: bool = False
    arrival_time: float = 0.0  # wall clock at the api, for the ingest phase (see RequestTimings)
    # Constrained decoding: the output must match this (response_format, guided_*, tool_choice required).
    grammar: GrammarSpec | None = None
    # OpenAI `tools` (function definitions) for the chat template.
    tools: list[dict[str, object]] | None = None


@dataclass
class AbortRequest:
    """Stop a request and drop its state (api -> tokenizer on disconnect; tokenizer -> scheduler)."""

    TAG: ClassVar[str] = "abort_request"

    req_id: str


@dataclass
class TokenizeRequest:
    """The /tokenize endpoint: exactly one of prompt / messages is set."""

    TAG: ClassVar[str] = "tokenize_request"

    req_id: str
    prompt: str | None = None
    messages: list[dict[str, object]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


@dataclass
class DetokenizeRequest:
    """The /detokenize endpoint."""

    TAG: ClassVar[str] = "detokenize_request"

    req_id: str
    token_ids: TokenIds


# --------------------------------------------------------------------------- tokenizer -> scheduler


@dataclass
class TokenizedRequest:
    """A prompt ready to queue. The scheduler answers the tokenizer (a ROUTER peer) that sent it."""

    TAG: ClassVar[str] = "tokenized_request"

    req_id: str
    prompt_token_ids: TokenIds
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    # The checked grammar of a constrained request, as EBNF (xgrammar's dialect); None: unconstrained.
    grammar: str | None = None


# --------------------------------------------------------------------------- scheduler -> gpu_worker


@dataclass
class NewRequestData:
    """A request the worker has not seen (or must rebuild after preemption): everything, in full."""

    req_id: str
    prompt_token_ids: TokenIds
    # Tokens already generated (non-empty only when a preempted request is resumed by recomputation).
    output_token_ids: TokenIds
    sampling_params: SamplingParams
    block_ids: BlockIds
    num_computed_tokens: int
    # The seed the sampler uses for this request (the request's own seed, or one the scheduler drew).
    sampling_seed: int
    # EBNF grammar the sampled tokens must follow (TokenizedRequest.grammar); None: unconstrained.
    grammar: str | None = None


@dataclass
class CachedRequestData:
    """Requests the worker already holds: only ids, new blocks and the computed-token counter."""

    req_id: str
    new_block_ids: BlockIds
    num_computed_tokens: int
    # Pipeline parallelism only: the request's last sampled token, which stages that do not sample lack
    # (the last stage samples; stage 0 embeds). Empty otherwise: a single stage keeps its own tokens.
    new_token_ids: TokenIds = field(default_factory=list)


@dataclass
class StepPlan:
    TAG: ClassVar[str] = "step_plan"

    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Tokens to run this step for each scheduled request, in batch order (new requests first, then cached).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests finished or aborted since the last plan; the worker drops their state.
    finished_req_ids: list[str] = field(default_factory=list)
    # Requests preempted since the last plan: the worker drops their state too (they return as new).
    preempted_req_ids: list[str] = field(default_factory=list)
    # Speculative decoding: draft tokens proposed for a running request. Its scheduled tokens are its newest
    # token plus these; the worker verifies them and samples one more (StepResult.num_accepted_drafts).
    spec_token_ids: dict[str, TokenIds] = field(default_factory=dict)
    # Speculative decoding with a draft model: how many draft tokens the worker's draft model proposes for a
    # running request at the start of this step (its scheduled tokens are its newest token plus that many);
    # they are verified in the same step and come back in StepResult.draft_token_ids.
    num_draft_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


# --------------------------------------------------------------------------- gpu_worker -> scheduler


@dataclass
class TopLogprobs:
    """Log-probabilities for one sampled token and the top-N alternatives at that position."""

    token_logprob: float
    top_token_ids: TokenIds
    top_logprobs: list[float]


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens 1..P-1, each given the tokens before it (token 0 has no context): the token's
    own logprob and rank (1 = the model's top choice), and the top `num_top` of that position, flattened
    row-major (position i's are top_*[i * num_top:(i + 1) * num_top])."""

    token_logprobs: list[float] = field(default_factory=list)
    token_ranks: list[int] = field(default_factory=list)
    top_token_ids: TokenIds = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    num_top: int = 0


@dataclass
class StepResult:
    TAG: ClassVar[str] = "step_result"

    step_id: int
    # Requests that produced a token this step (a prefill chunk that does not reach the end samples nothing).
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: TokenIds = field(default_factory=list)
    # Parallel to req_ids; None where the request did not ask for logprobs.
    logprobs: list[TopLogprobs | None] = field(default_factory=list)
    # Seconds the worker spent in the forward + sampling (for metrics and benchmarks).
    execute_time: float = 0.0
    # Requests that asked for prompt logprobs and sampled their first token this step: every chunk's, whole.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    # Requests the worker could not serve for a fault of their own (a grammar that does not compile) -> why.
    # They fail alone, as a 400; the step's other requests go on.
    failed: dict[str, str] = field(default_factory=dict)
    # Requests the plan gave draft tokens: how many of them were accepted. The request's new tokens are that
    # many drafts followed by its entry in sampled_token_ids (the correction, or the bonus token if all passed).
    num_accepted_drafts: dict[str, int] = field(default_factory=dict)
    # Requests the plan gave draft-model drafts (StepPlan.num_draft_tokens): the drafts the worker proposed
    # and verified, of which the first num_accepted_drafts were accepted.
    draft_token_ids: dict[str, TokenIds] = field(default_factory=dict)


@dataclass
class WorkerReady:
    """gpu_worker rank -> scheduler, once its model and KV cache exist (also after a restart). Everything
    else about the model the scheduler already has from its resolved config."""

    TAG: ClassVar[str] = "worker_ready"

    rank: int
    num_blocks: int
    load_seconds: float = 0.0
    device: str = ""


@dataclass
class WorkerError:
    """gpu_worker rank 0 -> scheduler: executing a step raised; the step's requests fail with this message."""

    TAG: ClassVar[str] = "worker_error"

    step_id: int
    message: str


# --------------------------------------------------------------------------- scheduler -> tokenizer


@dataclass
class RequestTimings:
    """A request's phases in seconds, for the api's metrics (request_*_time_seconds):

        ingest: api arrival (GenerateRequest.arrival_time) -> queued by the scheduler (wall clock, >= 0);
        queue: queued -> first scheduled;  prefill: first scheduled -> first token seen by the scheduler;
        decode: first token -> finished;   inference: first scheduled -> finished (= prefill + decode).

    A preemption does not restart any phase: its wait and recomputation fall in prefill (before the first
    token) or decode (after it). A phase is None until its end has happened.
    """

    ingest: float | None = None
    queue: float | None = None
    prefill: float | None = None
    decode: float | None = None
    inference: float | None = None

    def update(self, newer: RequestTimings) -> None:
        """Take every phase `newer` knows (a later output's word on a phase replaces an earlier one)."""
        for name in ("ingest", "queue", "prefill", "decode", "inference"):
            value = getattr(newer, name)
            if value is not None:
                setattr(self, name, value)


@dataclass
class RequestOutput:
    """What one request produced in one engine step: new token ids, and why it finished if it did."""

    req_id: str
    new_token_ids: TokenIds
    # Parallel to new_token_ids when the request asked for logprobs.
    new_logprobs: list[TopLogprobs] | None = None
    finished: bool = False
    # "stop" (EOS / stop token / stop string), "length" (max_tokens or max_model_len), "abort", "error"
    finish_reason: str | None = None
    # The stop token id that ended the request, if any (OpenAI's `stop_reason`).
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # HTTP-style status for `error`: 400 when the request itself was at fault, 500/503 when the engine was.
    error_code: int | None = None
    # Set only on the output that carries the request's first token and on the one that finishes it.
    timings: RequestTimings | None = None
    # Times preempted so far (num_preemptions_total), on every output.
    num_preemptions: int = 0
    # On the output with the first token, when the request asked for prompt logprobs.
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class BatchRequestOutput:
    """One engine step's outputs for the requests one tokenizer instance owns."""

    TAG: ClassVar[str] = "batch_request_output"

    outputs: list[RequestOutput]
    step_id: int = 0


# --------------------------------------------------------------------------- tokenizer -> api


@dataclass
class ErrorInfo:
    """A request-level failure, shaped like the HTTP error body the api returns."""

    message: str
    type: str = "BadRequestError"
    # The OpenAI request field at fault ("prompt", "messages.[0].role", ...), when one is.
    param: str | None = None
    code: int = 400  # the HTTP status the api should answer with


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token with the tokens as text, and the top alternatives (parallel lists)."""

    token: str
    logprob: float
    top_token_ids: TokenIds
    top_tokens: list[str]
    top_logprobs: list[float]


@dataclass
class PromptLogprobsText:
    """A prompt's logprobs with its tokens as text (tokenizer -> api, for echo + logprobs and prompt_logprobs)."""

    token_ids: TokenIds  # all P prompt tokens
    tokens: list[str]  # the text of each
    logprobs: PromptLogprobs  # tokens 1..P-1
    top_tokens: list[str]  # the text of each of logprobs.top_token_ids


@dataclass
class TextDelta:
    """What one request produced since its last delta, detokenized and stop-string checked."""

    TAG: ClassVar[str] = "text_delta"

    req_id: str
    text: str = ""
    token_ids: TokenIds = field(default_factory=list)
    # Parallel to token_ids when the request asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, for usage
    num_cached_tokens: int = 0
    # The prompt as text, on the first delta of an `echo` request.
    prompt_text: str | None = None
    error: ErrorInfo | None = None
    # Carried from the request's RequestOutput. A request the tokenizer ends on a stop string has no finish
    # from the scheduler: its decode is timed in the tokenizer, from the first token's output arriving there.
    timings: RequestTimings | None = None
    num_preemptions: int = 0
    # On the first delta, when the request asked for prompt logprobs.
    prompt_logprobs: PromptLogprobsText | None = None


@dataclass
class BatchTextDelta:
    """One step's deltas for the requests one api instance owns."""

    TAG: ClassVar[str] = "batch_text_delta"

    deltas: list[TextDelta]


@dataclass
class TokenizeResponse:
    TAG: ClassVar[str] = "tokenize_response"

    req_id: str
    token_ids: TokenIds = field(default_factory=list)
    token_strs: list[str] | None = None
    error: ErrorInfo | None = None


@dataclass
class DetokenizeResponse:
    TAG: ClassVar[str] = "detokenize_response"

    req_id: str
    text: str = ""
    error: ErrorInfo | None = None


# --------------------------------------------------------------------------- scheduler -> api


@dataclass
class EngineStats:
    """Gauges and counters the api exports on /metrics (sent by the scheduler every so often)."""

    TAG: ClassVar[str] = "engine_stats"

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative prompt tokens found there
    # False while the engine cannot run requests (workers loading or restarting after a failure): the apis
    # answer /health with 503 from this message at once, rather than after EngineStats stops for a while.
    serving: bool = True
    num_waiting_tokens: int = 0  # prompt tokens of the waiting requests (--max-queued-tokens)
    # --data-parallel-size: which replica sent these (the api's `replica` label), and its load as the tokenizers'
    # replica router weighs it: tokens the running requests still have to prefill, plus one per running request.
    data_parallel_rank: int = 0
    num_running_tokens: int = 0
    # Speculative decoding, cumulative (vLLM's spec_decode_* counters): steps of a request that carried drafts,
    # draft tokens proposed, of those accepted, and accepted by draft position (index 0 = first draft).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- control


@dataclass
class Heartbeat:
    TAG: ClassVar[str] = "heartbeat"

    sender: str  # "api", "tokenizer", "scheduler", "gpu_worker"
    index: int = 0
    timestamp: float = 0.0


@dataclass
class Shutdown:
    """Ask a process to leave its loop and exit cleanly."""

    TAG: ClassVar[str] = "shutdown"

    reason: str = ""


@dataclass
class WorkerFailed:
    """Launcher (supervisor) -> scheduler: a worker rank died; its in-flight requests must fail."""

    TAG: ClassVar[str] = "worker_failed"

    rank: int
    reason: str
