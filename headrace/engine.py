"""The engine in one process: scheduler + model runner, stepping together.

Used by the offline batch API, `headrace bench throughput` (engine-direct numbers) and tests. The
served pipeline runs the same Scheduler and ModelRunner in separate processes, exchanging the same
StepPlan / StepResult messages over ZeroMQ instead of calling each other.
"""

from __future__ import annotations

import random

from common.config import EngineConfig
from common.messages import RequestOutput
from common.sampling_params import SamplingParams
from services.gpu_worker.model_runner import ModelRunner
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler


class LLMEngine:
    def __init__(self, config: EngineConfig, log=print, runner: ModelRunner | None = None):
        self.config = config
        self.runner = runner or ModelRunner(config, log=log)
        # A config may ask for fewer blocks than the runner holds (tests that force preemption share a runner).
        num_blocks = min(config.cache.num_blocks or self.runner.num_blocks, self.runner.num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, self.runner.max_model_len)
        self.eos_token_ids = self.runner.eos_token_ids
        self.max_model_len = self.runner.max_model_len
        self._seeds = random.Random(config.model.seed)
        self._step_id = 0

    def draw_seed(self, params: SamplingParams) -> int:
        """The request's own seed, or one drawn from the engine's seeded stream (reproducible runs)."""
        return params.seed if params.seed is not None else self._seeds.getrandbits(63)

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        self.scheduler.add_request(Request(req_id, prompt_token_ids, params, self.draw_seed(params),
                                           self.eos_token_ids, arrival_time=arrival_time,
                                           max_model_len=self.max_model_len))

    def abort(self, req_ids: list[str]) -> list[RequestOutput]:
        return self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        return self.scheduler.update_from_output(plan, result)
