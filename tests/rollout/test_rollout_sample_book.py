"""A worker's bookkeeping of groups, samples and segments (no vLLM)."""

import pytest

from rollout.sample_book import SEGMENT_SEED_STRIDE, SampleBook
from rollout.types import GroupRequest, SamplingSettings


def group(group_id="g", n=2, max_tokens=5, seed=100, prompt=(7, 8)):
    return GroupRequest(group_id, list(prompt), SamplingSettings(
        samples_per_prompt=n, temperature=1.0, top_p=1.0, max_response_tokens=max_tokens, seed=seed))


def decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_each_sample_is_its_own_request_with_vllms_child_seed():
    book = SampleBook(0, decode)
    samples = book.add_group(group(n=3, seed=100))
    requests = [book.start(s, version=4) for s in samples]
    assert [r.seed for r in requests] == [100, 101, 102]  # vLLM's n > 1 gives child j seed + j
    assert [r.request_id for r in requests] == ["g/0/0", "g/1/0", "g/2/0"]
    assert all(r.prompt_token_ids == [7, 8] and r.max_tokens == 5 for r in requests)
    assert book.in_flight_samples == 3


def test_a_group_comes_back_once_all_its_samples_finished():
    book = SampleBook(1, decode)
    a, b = book.add_group(group())
    book.start(a, 0)
    book.start(b, 0)
    assert book.on_output("g/0/0", [1, 2], [-0.1, -0.2], "stop", "bc") is None
    book.on_output("g/1/0", [3], [-0.3], None, "d")  # still running
    done = book.on_output("g/1/0", [4], [-0.4], "length", "e")  # what came since
    assert done is not None and done.group_id == "g" and done.worker_index == 1
    first, second = done.samples
    assert first.response_token_ids == [1, 2] and first.response_logprobs == [-0.1, -0.2]
    assert first.finish_reason == "stop"
    assert (second.response_token_ids, second.response_text) == ([3, 4], "de")
    assert first.token_versions == [0, 0] and first.weight_version == 0
    assert book.in_flight_samples == 0 and book.running == {}


def test_an_interrupted_sample_continues_with_its_tokens_in_the_prompt_and_new_versions():
    book = SampleBook(0, decode)
    (sample,) = book.add_group(group(n=1, max_tokens=5, seed=10))
    book.start(sample, version=3)
    book.on_output("g/0/0", [1, 2], [-0.1, -0.2], None, "bc")
    to_continue, to_abort = book.interrupt_all()
    assert to_abort == ["g/0/0"] and to_continue == [sample] and book.interrupted == 1
    request = book.start(sample, version=4)
    assert request.request_id == "g/0/1"
    assert request.prompt_token_ids == [7, 8, 1, 2]  # the tokens so far join the prompt
    assert request.max_tokens == 3  # what is left of the budget
    assert request.seed == 10 + SEGMENT_SEED_STRIDE  # a fresh random stream
    done = book.on_output("g/0/1", [5], [-0.5], "stop", "f")
    (result,) = done.samples
    assert result.response_token_ids == [1, 2, 5]
    assert result.response_logprobs == [-0.1, -0.2, -0.5]
    assert result.token_versions == [3, 3, 4]
    assert result.weight_version == 3  # the oldest token's version: what staleness counts
    assert result.response_text == decode([1, 2, 5])  # spelled out whole, not the last segment


def test_a_late_output_of_an_aborted_segment_is_ignored():
    book = SampleBook(0, decode)
    (sample,) = book.add_group(group(n=1))
    book.start(sample, 0)
    book.on_output("g/0/0", [1], [-0.1], None, "b")
    book.interrupt_all()
    assert book.on_output("g/0/0", [2], [-0.2], "stop", "c") is None
    assert sample.tokens == [1]


def test_a_sample_that_used_its_whole_budget_finishes_at_the_interruption():
    book = SampleBook(0, decode)
    (sample,) = book.add_group(group(n=1, max_tokens=2))
    book.start(sample, 0)
    book.on_output("g/0/0", [1, 2], [-0.1, -0.2], None, "bc")
    to_continue, _ = book.interrupt_all()
    assert to_continue == []
    (done,) = book.finished
    assert done.samples[0].finish_reason == "length" and done.samples[0].response_text == "bc"


def test_top_logprobs_follow_the_tokens_across_segments():
    book = SampleBook(0, decode)
    (sample,) = book.add_group(group(n=1))
    book.start(sample, 0)
    book.on_output("g/0/0", [1], [-0.1], None, "b", ([[1, 2]], [[-0.1, -2.0]]))
    book.interrupt_all()
    book.start(sample, 1)
    done = book.on_output("g/0/1", [3], [-0.3], "stop", "d", ([[3, 1]], [[-0.3, -1.5]]))
    (result,) = done.samples
    assert result.response_top_token_ids == [[1, 2], [3, 1]]
    assert result.response_top_logprobs == [[-0.1, -2.0], [-0.3, -1.5]]


def test_a_group_id_can_be_held_once():
    book = SampleBook(0, decode)
    book.add_group(group())
    with pytest.raises(ValueError, match="already"):
        book.add_group(group())


def test_drop_all_returns_the_running_requests_to_abort():
    book = SampleBook(0, decode)
    a, b = book.add_group(group())
    book.start(a, 0)
    assert book.drop_all() == ["g/0/0"]
    assert book.in_flight_samples == 0 and book.finished == []
