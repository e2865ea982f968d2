import sys

from headrace.common.sampling_params import SamplingParams
from headrace.services.scheduler.request import Request, RequestStatus


def make(prompt_len: int = 5, max_model_len: int | None = 100, **params) -> Request:
    return Request("r", list(range(prompt_len)), SamplingParams(**params), sampling_seed=7,
                   eos_token_ids=(2,), max_model_len=max_model_len)


def test_lengths_follow_appended_tokens():
    req = make(prompt_len=5)
    assert (req.num_prompt_tokens, req.num_output_tokens, req.num_tokens) == (5, 0, 5)
    req.append_output_token(42)
    req.append_output_token(43)
    assert (req.num_prompt_tokens, req.num_output_tokens, req.num_tokens) == (5, 2, 7)
    assert req.all_token_ids == [0, 1, 2, 3, 4, 42, 43]
    assert req.output_token_ids == [42, 43]
    assert req.prompt_token_ids == [0, 1, 2, 3, 4]


def test_max_tokens_is_resolved_against_max_model_len():
    assert make(prompt_len=10, max_tokens=5).max_tokens == 5
    assert make(prompt_len=10, max_tokens=500).max_tokens == 90
    assert make(prompt_len=10, max_tokens=None).max_tokens == 90
    assert make(prompt_len=100, max_tokens=None).max_tokens == 1  # a full-length prompt still gets a token
    assert make(prompt_len=10, max_tokens=None, max_model_len=None).max_tokens == sys.maxsize
    req = make(prompt_len=10, max_tokens=None, max_model_len=None)
    req.max_model_len = 30  # binding later (what the scheduler does) resolves again
    assert req.max_tokens == 20


def test_status_and_finish_reason():
    req = make()
    assert req.status == RequestStatus.WAITING and not req.is_finished and req.finish_reason is None
    for status, reason in [(RequestStatus.FINISHED_STOPPED, "stop"), (RequestStatus.FINISHED_LENGTH, "length"),
                           (RequestStatus.FINISHED_ABORTED, "abort")]:
        req.status = status
        assert req.is_finished and req.finish_reason == reason
    req.status = RequestStatus.PREEMPTED
    assert not req.is_finished


def test_ending_token_ids_include_eos_unless_ignored():
    assert make(stop_token_ids=[9]).ending_token_ids == {2, 9}
    assert make(stop_token_ids=[9], ignore_eos=True).ending_token_ids == {9}


def test_logprobs_are_kept_only_when_given():
    from headrace.common.messages import TopLogprobs

    req = make()
    req.append_output_token(1)
    req.append_output_token(3, TopLogprobs(-0.5, [3], [-0.5]))
    assert len(req.output_logprobs) == 1
