"""A minimal plan builder for model-runner tests: allocates blocks in order and splits prompts into chunks.

It stands in for the scheduler only where a test must control the exact batch shape (one request, a
fixed mixed batch, prefill chunks of 7 tokens); the scheduler's own policy is tested under
tests/services/scheduler.
"""

from __future__ import annotations

from headrace.common.messages import CachedRequestData, NewRequestData, StepPlan
from headrace.common.sampling_params import SamplingParams


class PlanDriver:
    def __init__(self, runner, chunk_size: int | None = None):
        self.runner = runner
        self.block_size = runner.block_size
        self.chunk_size = chunk_size
        self.next_block = 0
        self.step = 0
        self.prompt_logprobs: dict = {}  # request id -> PromptLogprobs, for requests that asked

    def generate(self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int,
                 seeds: list[int] | None = None) -> list[list[int]]:
        """Run all prompts together to max_new_tokens each (no EOS stop); returns new token ids per prompt."""
        reqs = {}
        for i, prompt in enumerate(prompts):
            reqs[f"r{self.step}-{i}"] = {"prompt": list(prompt), "out": [], "computed": 0, "blocks": [],
                                         "seed": (seeds or [0] * len(prompts))[i], "sent": False}
        while any(len(r["out"]) < max_new_tokens for r in reqs.values()):
            plan = StepPlan(step_id=self.step)
            self.step += 1
            for rid, r in reqs.items():
                if len(r["out"]) >= max_new_tokens:
                    continue
                total = len(r["prompt"]) + len(r["out"])
                n = total - r["computed"]
                if self.chunk_size:
                    n = min(n, self.chunk_size)
                need = -(-(r["computed"] + n) // self.block_size) - len(r["blocks"])
                new_blocks = list(range(self.next_block, self.next_block + max(need, 0)))
                self.next_block += len(new_blocks)
                r["blocks"] += new_blocks
                if not r["sent"]:
                    plan.new_requests.append(NewRequestData(rid, r["prompt"], [], params, list(r["blocks"]),
                                                            r["computed"], r["seed"]))
                    r["sent"] = True
                else:
                    plan.cached_requests.append(CachedRequestData(rid, new_blocks, r["computed"]))
                plan.num_scheduled_tokens[rid] = n
                r["n"] = n
            result = self.runner.execute(plan)
            self.prompt_logprobs.update(result.prompt_logprobs)
            for rid in plan.num_scheduled_tokens:
                reqs[rid]["computed"] += reqs[rid]["n"]
            for rid, tok in zip(result.req_ids, result.sampled_token_ids):
                reqs[rid]["out"].append(tok)
        self.runner.execute(StepPlan(step_id=self.step, finished_req_ids=list(reqs)))
        self.step += 1
        return [r["out"] for r in reqs.values()]


def capture_logits(runner) -> list:
    """Wrap runner.model.compute_logits so every call's logits (float32, on the CPU) are appended to the
    returned list: the logits at each sampled position, for comparisons with an oracle."""
    seen: list = []
    original = runner.model.compute_logits

    def compute_logits(hidden):
        logits = original(hidden)
        seen.append(logits.float().cpu())
        return logits

    runner.model.compute_logits = compute_logits
    return seen
