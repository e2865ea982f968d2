"""Grammars where tokens are sampled: each constrained request's EBNF (checked by the tokenizer) compiled
against the vocabulary, and one matcher per request that the sampled tokens advance.

Compiling runs on one background thread, started when a plan brings the request in: xgrammar releases the GIL
while it compiles, so the work overlaps the request's prefill forward and the steps of everyone else; the
first sampling of the request waits for it only if it is not done yet. Compiled grammars are cached by their
EBNF text, so a burst of requests under one schema compiles it once (tokenizer/grammar.py says why the EBNF,
not the compiled form, crosses the wire).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class GrammarError(Exception):
    """A request's grammar could not be compiled here: that request fails (a 400), not the step."""


class GrammarRuntime:
    def __init__(self, tokenizer_dir: str, vocab_size: int, stop_token_ids: tuple[int, ...], capacity: int = 256):
        """`vocab_size`: the logits' width (the model's embedding rows, which may exceed the tokenizer's);
        `stop_token_ids`: the tokens that end a completed grammar (the model's EOS ids)."""
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.capacity = capacity
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._compiled: OrderedDict[str, Future] = OrderedDict()
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher: its own threads fill many rows' masks at once

    def fill_bitmasks(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        """Row j of `bitmask` [rows, ceil(vocab / 32)] int32: the tokens matchers[j] allows next. Many rows are
        filled on xgrammar's threads at once (a serial loop cost ~0.2 ms a row at 64 JSON-schema rows of a
        128k vocabulary; it releases the GIL)."""
        if len(matchers) == 1:  # no threads to share the work
            matchers[0].fill_next_token_bitmask(bitmask, 0)
            return
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, len(os.sched_getaffinity(0)))))
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def prepare_in_background(self) -> None:
        """`prepare` on the compile thread (the server calls it at start; grammars queue behind it)."""
        self._pool.submit(self.prepare)

    def prepare(self) -> None:
        """Build the vocabulary tables now (about a second) instead of at the first constrained request."""
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import AutoTokenizer

            if not self.tokenizer_dir:
                raise RuntimeError("structured outputs need the model's tokenizer; none was found for this model")
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            # xgrammar's own cache is off: this one is bounded and keyed the same way (the EBNF text).
            self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=False)

    def start(self, ebnf: str) -> Future:
        """The grammar compiled (a future): from the cache, or queued on the compile thread."""
        future = self._compiled.get(ebnf)
        if future is None:
            future = self._compiled[ebnf] = self._pool.submit(self._compile, ebnf)
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(ebnf)
        return future

    def _compile(self, ebnf: str) -> Any:
        self.prepare()
        try:
            return self.compile(ebnf)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with its reason
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GrammarError(f"the request's grammar could not be compiled against this model's vocabulary: "
                               f"{reason}") from e

    def compile(self, ebnf: str) -> Any:
        """xgrammar's compiled grammar of `ebnf` (after `prepare`)."""
        return self._compiler.compile_grammar(ebnf)

    def _forget(self, compiled: Future) -> None:
        for ebnf, future in list(self._compiled.items()):
            if future is compiled:
                del self._compiled[ebnf]

    def matcher(self, compiled: Future, output_token_ids: list[int]) -> Any:
        """A matcher at the request's current position: tokens it already generated (a request resumed after
        preemption brings its outputs along) are replayed into it. Raises GrammarError when the grammar did
        not compile, and whatever `prepare` raised (the model has no tokenizer) as a GrammarError too."""
        import xgrammar as xgr

        try:
            grammar = compiled.result()
        except Exception as e:
            self._forget(compiled)  # a later request may try again (a failure may not be the grammar's)
            if isinstance(e, GrammarError):
                raise
            raise GrammarError(f"structured output is not available: {e}") from e
        matcher = xgr.GrammarMatcher(grammar)
        for tok in output_token_ids:
            if not matcher.accept_token(tok):
                log.warning("a resumed request's token %d does not follow its grammar", tok)
                break
        return matcher
