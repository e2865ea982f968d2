"""The speculative draft model (--speculative-config method "draft_model"): a small model of the target's
vocabulary that proposes a request's draft tokens at the start of the step that verifies them.

Its KV lives in its own paged tensors with as many blocks as the target's, addressed through the target's
block tables: the scheduler allocates (and trims, on rejection) one set of block ids and both models use it,
so the block manager knows nothing of the draft. A request's draft KV is valid for its first
`draft_computed` tokens; each proposal first runs the draft over the tokens it has not seen (the whole prompt
the first time, afterwards the tokens accepted since), then feeds its own drafts back k - 1 times. After
verification only the accepted drafts' KV stays valid (RequestState.accept_drafts).

Drafts are sampled from the draft's distribution q (the request's own sampling parameters applied to the
draft's logits; one-hot on greedy rows) with the sampler's own noise for their output index, and q is kept for
the verification (rejection_sampler.accept_model_drafts, which says why that noise), which accepts with
probability min(1, p/q).
"""

from __future__ import annotations

import torch

from headrace.common.config import EngineConfig
from headrace.services.gpu_worker.attention import make_backend
from headrace.services.gpu_worker.batch_inputs import prepare_batch
from headrace.services.gpu_worker.kv_cache import KVCacheLayout
from headrace.services.gpu_worker.loader.model_loader import load_model
from headrace.services.gpu_worker.model.llama import ForwardContext
from headrace.services.gpu_worker.model.rope import rope_cos_sin_cache
from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import (
    Sampler,
    SamplingRow,
    build_sampling_inputs,
    gumbel_argmax_,
    to_device,
    wrap_int64,
)


class _DraftView:
    """What prepare_batch reads of a request, as the draft sees it: its tokens with the drafts so far, its KV
    valid up to num_computed_tokens (the draft's, not the target's), and the target's block table."""

    __slots__ = ("req_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "draft_token_ids",
                 "block_table", "num_blocks", "prompt_scores")

    def __init__(self, state: RequestState) -> None:
        self.req_id = state.req_id
        self.token_ids = list(state.token_ids)
        self.num_prompt_tokens = state.num_prompt_tokens
        self.num_computed_tokens = state.draft_computed
        self.draft_token_ids: list[int] = []
        self.block_table, self.num_blocks = state.block_table, state.num_blocks
        self.prompt_scores = None


class DraftModel:
    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, block_size: int) -> None:
        draft = config.resolved_draft
        assert draft is not None, "a draft-model config resolves its draft (resolve_engine_config)"
        loaded = load_model(draft, device, dtype, seed=config.model.seed, init_std=config.model.random_init_std)
        self.model, self.arch, self.device, self.block_size = loaded.model, loaded.arch, device, block_size
        self.dtype = dtype
        self.name = draft.name
        self.cos_sin_cache = rope_cos_sin_cache(loaded.hf_config, self.arch.head_dim, draft.max_model_len, device)
        self.backend = make_backend(config.attention_backend, device, block_size)
        attn = self.model.layers[0].self_attn
        self.kv_layout = KVCacheLayout(len(self.model.layers), block_size, attn.num_kv_heads, self.arch.head_dim,
                                       dtype)
        self.kv_caches: list = []
        self.sampler = Sampler()

    def allocate(self, num_blocks: int) -> None:
        """Its KV tensors: as many blocks as the target's, so that the target's block ids address them."""
        self.kv_caches = self.kv_layout.allocate(num_blocks, self.device)

    def warm_up(self, max_num_seqs: int, max_tokens: int) -> None:
        """Compile its attention kernels' variants before serving (CUDA only), as the target's are."""
        self.backend.warm_up(self.kv_caches[0], self.model.layers[0].self_attn.num_heads, max_num_seqs, max_tokens,
                             softcap=self.arch.attn_logit_softcap, q_dtype=self.dtype)

    @torch.no_grad()
    def propose(self, states: list[RequestState], counts: list[int], eos_token_ids: tuple[int, ...]) -> None:
        """Sets each state's draft_token_ids (counts[i] tokens) and draft_probs ([counts[i], V], q of each)."""
        views = {s.req_id: _DraftView(s) for s in states}
        by_id = {s.req_id: s for s in states}
        wanted = {s.req_id: n for s, n in zip(states, counts)}
        probs: dict[str, list[torch.Tensor]] = {rid: [] for rid in views}
        scheduled = {rid: len(v.token_ids) - v.num_computed_tokens for rid, v in views.items()}
        while scheduled:
            batch = prepare_batch(views, scheduled, self.block_size, self.device)
            ctx = ForwardContext(batch.attn, self.kv_caches, self.backend, self.cos_sin_cache)
            hidden = self.model(batch.input_ids, batch.positions, ctx)
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
            q, tokens = self._sample(logits, batch.sample_states, [by_id[v.req_id] for v in batch.sample_states],
                                     eos_token_ids)
            for i, (view, token) in enumerate(zip(batch.sample_states, tokens)):
                view.num_computed_tokens += scheduled[view.req_id]
                view.token_ids.append(token)
                probs[view.req_id].append(q[i])
            scheduled = {rid: 1 for rid, v in views.items() if len(probs[rid]) < wanted[rid]}
        for s in states:
            view = views[s.req_id]
            s.draft_token_ids = view.token_ids[len(s.token_ids):]
            s.draft_probs = torch.stack(probs[s.req_id])
            # The last draft was never fed back: its KV (and that of any later token) is not written.
            s.draft_computed = view.num_computed_tokens

    def _sample(self, logits: torch.Tensor, views: list[_DraftView], states: list[RequestState],
                eos_token_ids: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
        """q for each row (the request's sampling applied to the draft's logits) and a token drawn from it with
        the noise the sampler would draw that output with."""
        rows = [SamplingRow(s.params, s.seed, v.token_ids, s.num_prompt_tokens, eos_token_ids)
                for v, s in zip(views, states)]
        inputs = build_sampling_inputs(rows, self.arch.vocab_size, self.device)
        q = self.sampler.probabilities(logits, inputs)
        if inputs.all_greedy:  # q is one-hot: no noise to draw
            return q, q.argmax(dim=-1).tolist()
        seeds = to_device([wrap_int64(s.seed) for s in states], torch.int64, self.device)
        steps = to_device([r.num_output_tokens for r in rows], torch.int64, self.device)
        # The next draft's input is this token: it must reach the host (a draft step is small; the sync is cheap).
        return q, gumbel_argmax_(q.log(), seeds, steps).tolist()
