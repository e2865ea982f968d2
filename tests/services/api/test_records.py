"""Per-request timing records."""

from __future__ import annotations

from headrace.common.messages import TextDelta
from headrace.services.api.records import RequestRecord


def test_record_tracks_first_token_each_token_and_finish():
    record = RequestRecord("r", arrival=10.0)
    record.on_delta(TextDelta("r", num_prompt_tokens=5), 10.5)  # nothing generated yet
    assert record.first_token is None
    record.on_delta(TextDelta("r", token_ids=[1], num_prompt_tokens=5, num_output_tokens=1), 11.0)
    record.on_delta(TextDelta("r", token_ids=[2, 3], num_prompt_tokens=5, num_output_tokens=3, num_cached_tokens=4),
                    11.5)
    record.on_delta(TextDelta("r", token_ids=[4], finished=True, finish_reason="length", num_prompt_tokens=5,
                              num_output_tokens=4), 12.0)
    assert record.time_to_first_token == 1.0 and record.e2e_latency == 2.0
    assert record.token_times == [11.0, 11.5, 11.5, 12.0]
    assert record.inter_token_latencies == [0.5, 0.0, 0.5]
    assert (record.num_prompt_tokens, record.num_output_tokens, record.num_cached_tokens) == (5, 4, 4)
    assert record.finish_reason == "length"
    record.on_finish("abort", 13.0)  # the first finish wins
    assert (record.finished, record.finish_reason) == (12.0, "length")
