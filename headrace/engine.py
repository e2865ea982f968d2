"""The engine in one process: scheduler + model runner, stepping together.

Used by the offline batch API, `headrace bench throughput` (engine-direct numbers) and tests. The
served pipeline runs the same Scheduler and ModelRunner in separate processes, exchanging the same
StepPlan / StepResult messages over ZeroMQ instead of calling each other.
"""

from __future__ import annotations

import random

from headrace.common.config import ConfigError, EngineConfig
from headrace.common.messages import RequestOutput, StepPlan
from headrace.common.models.resolve import resolve_engine_config
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from headrace.services.scheduler.request import Request
from headrace.services.scheduler.scheduler import Scheduler


class LLMEngine:
    def __init__(self, config: EngineConfig, log=print, runner: ModelRunner | None = None):
        if config.parallel.world_size > 1:  # one process holds one rank: parallel runs need `headrace serve`
            raise ConfigError("the in-process engine runs one worker rank; tensor or pipeline parallelism needs "
                              "`headrace serve`")
        self.config = config = resolve_engine_config(config, log=log)
        model = config.require_resolved()
        self.runner = runner or ModelRunner(config, log=log)
        # A config may ask for fewer blocks than the runner holds (tests that force preemption share a runner).
        num_blocks = min(config.cache.num_blocks or self.runner.num_blocks, self.runner.num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, model.max_model_len, model.kv_window,
                                   speculative=config.speculative)
        self.eos_token_ids = model.eos_token_ids
        self.max_model_len = model.max_model_len
        self._seeds = random.Random(config.model.seed)
        # How many steps to keep launched on the runner. With async scheduling step t+1 is planned and
        # launched before step t's tokens are read back, as the served pipeline does.
        self._depth = 2 if config.scheduler.async_scheduling else 1
        # The plan whose result the last step() applied (None if it applied none): what that step computed,
        # for benchmarks that break their time down by step composition. Steps the engine finishes only
        # to drain itself once idle (_drain_if_idle) are not reported here.
        self.last_plan: StepPlan | None = None

    def draw_seed(self, params: SamplingParams) -> int:
        """The request's own seed, or one drawn from the engine's seeded stream (reproducible runs)."""
        return params.seed if params.seed is not None else self._seeds.getrandbits(63)

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, grammar: str | None = None) -> None:
        """`grammar`: a constrained request's checked EBNF (services/tokenizer/grammar.py), as served."""
        self.scheduler.add_request(Request(req_id, prompt_token_ids, params, self.draw_seed(params),
                                           self.eos_token_ids, arrival_time=arrival_time,
                                           max_model_len=self.max_model_len, grammar=grammar))

    def abort(self, req_ids: list[str]) -> list[RequestOutput]:
        outputs = self.scheduler.abort_requests(req_ids)
        self._drain_if_idle()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Keep up to `depth` steps launched, then wait for the oldest and apply its tokens."""
        while self.runner.num_in_flight < self._depth and self.scheduler.has_unfinished_requests():
            plan = self.scheduler.schedule()
            self.runner.launch(plan)
            if plan.is_empty:  # nothing runnable until a token in flight arrives
                break
        if not self.runner.num_in_flight:
            self.last_plan = None
            return []
        self.last_plan, outputs = self._finish_oldest()
        self._drain_if_idle()
        return outputs

    def _finish_oldest(self) -> tuple[StepPlan, list[RequestOutput]]:
        """The oldest launched step's plan, and its tokens applied to the scheduler."""
        plan, result = self.runner.finish_oldest()
        return plan, ([] if plan.is_empty else self.scheduler.update_from_output(plan, result))

    def _drain_if_idle(self) -> None:
        """Once every request has ended, what is still in flight belongs to none of them (aborted requests,
        an empty plan): finish it, so an idle engine leaves its runner with nothing launched."""
        if self.scheduler.has_unfinished_requests():
            return
        while self.runner.num_in_flight:
            self._finish_oldest()
