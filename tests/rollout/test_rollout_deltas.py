"""A worker reads vLLM's outputs as increments (RequestOutputKind.DELTA), no engine.

The increments come from vLLM's own output processor, fed with what an engine core would
report step by step, so the slicing of the flat log-prob lists and of the text is vLLM's.
"""

import random
import time

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.outputs import LogprobsLists

from launch.models.tiny_model import build_tokenizer
from rollout.sample_book import SampleBook
from rollout.types import GroupRequest, SamplingSettings
from rollout.worker import read_flat_logprobs, record_delta

ANSWER_TOKENS = 2000
TOP_K = 3
PROMPT = [10, 11, 12]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def generated(num_tokens: int, seed: int):
    """What an engine core would sample: per position the token, K top tokens, and the
    log-probs of all K + 1, sampled first, as vLLM's sampler lays them out."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 98, num_tokens)  # printable characters, no special tokens
    top_ids = rng.integers(3, 98, (num_tokens, TOP_K))
    logprobs = -rng.random((num_tokens, TOP_K + 1), dtype=np.float32) * 5
    return tokens, np.column_stack([tokens, top_ids]), logprobs


def uneven_steps(num_tokens: int, seed: int) -> list[slice]:
    """Positions each engine step adds: 0 to 9 at a time, as with speculative decoding."""
    rng, steps, start = random.Random(seed), [], 0
    while start < num_tokens:
        end = min(num_tokens, start + rng.randint(0, 9))
        steps.append(slice(start, end))
        start = end
    return steps


def vllm_outputs(tokenizer, request_id, kind, data, steps, top_k, detokenize, finish=True):
    """Run the steps through vLLM's output processor; yields its RequestOutputs. With
    ``finish`` the request ends at the last step, by length."""
    tokens, ids, logprobs = data
    processor = OutputProcessor(tokenizer, log_stats=False)
    params = SamplingParams(max_tokens=len(tokens), logprobs=top_k, flat_logprobs=True,
                            detokenize=detokenize, output_kind=kind)
    processor.add_request(EngineCoreRequest(request_id, PROMPT, None, params, None, time.time(),
                                            None, None, None, external_req_id=request_id), None)
    for i, step in enumerate(steps):
        new = LogprobsLists(ids[step, :top_k + 1], logprobs[step, :top_k + 1],
                            np.ones(step.stop - step.start, dtype=np.int64))
        last = finish and i == len(steps) - 1
        yield from processor.process_outputs([EngineCoreOutput(
            request_id, tokens[step].tolist(), new_logprobs=new,
            finish_reason=FinishReason.LENGTH if last else None)]).request_outputs


def group(max_tokens):
    return GroupRequest("g", PROMPT, SamplingSettings(samples_per_prompt=1, temperature=1.0,
                                                      top_p=1.0, max_response_tokens=max_tokens,
                                                      seed=5))


@pytest.mark.parametrize("top_k, detokenize", [(0, True), (TOP_K, False)],
                         ids=["sampled-only-with-text", "top-k-decoded-at-the-end"])
def test_a_long_answer_in_uneven_deltas_adds_up_to_the_one_shot_read(tokenizer, top_k, detokenize):
    data = generated(ANSWER_TOKENS, seed=1)
    steps = uneven_steps(ANSWER_TOKENS, seed=2)
    assert len(steps) > 300 and any(s.start == s.stop for s in steps)
    book = SampleBook(0, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    (sample,) = book.add_group(group(ANSWER_TOKENS))
    book.start(sample, version=0)

    done = [record_delta(book, output, detokenized=detokenize)
            for output in vllm_outputs(tokenizer, "g/0/0", RequestOutputKind.DELTA, data, steps,
                                       top_k, detokenize)]
    # One output per step, and the group comes back with the last one only.
    assert len(done) == len(steps) and all(d is None for d in done[:-1])
    (result,) = done[-1].samples

    (whole,) = vllm_outputs(tokenizer, "g/0/0", RequestOutputKind.FINAL_ONLY, data, steps,
                            top_k, detokenize)
    one_shot_logprobs, (one_shot_top_ids, one_shot_top_logprobs) = \
        read_flat_logprobs(whole.outputs[0].logprobs)
    assert result.response_token_ids == list(whole.outputs[0].token_ids)
    assert result.response_logprobs == one_shot_logprobs
    assert result.response_top_token_ids == one_shot_top_ids
    assert result.response_top_logprobs == one_shot_top_logprobs
    # And the one-shot read is what the engine core reported.
    tokens, ids, logprobs = data
    assert result.response_token_ids == tokens.tolist()
    assert result.response_logprobs == logprobs[:, 0].tolist()
    if top_k:
        assert result.response_top_token_ids == ids[:, 1:].tolist()
        assert result.response_top_logprobs == logprobs[:, 1:].tolist()
    else:
        assert result.response_top_token_ids == result.response_top_logprobs == []
    # The whole response, not the last increment.
    assert result.response_text == tokenizer.decode(tokens.tolist())
    assert len(result.response_text) == ANSWER_TOKENS
    if detokenize:
        assert result.response_text == whole.outputs[0].text
    assert result.finish_reason == "length" and book.running == {}


def test_an_answer_interrupted_by_a_weight_update_continues_from_its_deltas(tokenizer):
    before, after = 700, ANSWER_TOKENS - 700
    data = generated(ANSWER_TOKENS, seed=3)
    first = tuple(part[:before] for part in data)
    second = tuple(part[before:] for part in data)
    book = SampleBook(0, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    (sample,) = book.add_group(group(ANSWER_TOKENS))
    book.start(sample, version=0)

    # The first segment is running; the weight update parks the engine between two steps,
    # after the outputs of the last one were read. vLLM never finishes this request.
    for output in vllm_outputs(tokenizer, "g/0/0", RequestOutputKind.DELTA, first,
                               uneven_steps(before, seed=4), TOP_K, False, finish=False):
        assert record_delta(book, output, detokenized=False) is None
    to_continue, to_abort = book.interrupt_all()
    assert to_continue == [sample] and to_abort == ["g/0/0"]

    request = book.start(sample, version=1)
    assert request.prompt_token_ids == PROMPT + data[0][:before].tolist()
    assert request.max_tokens == after
    outputs = vllm_outputs(tokenizer, request.request_id, RequestOutputKind.DELTA, second,
                           uneven_steps(after, seed=5), TOP_K, False)
    done = [record_delta(book, output, detokenized=False) for output in outputs]
    (result,) = done[-1].samples

    tokens, ids, logprobs = data
    assert result.response_token_ids == tokens.tolist()
    assert result.response_logprobs == logprobs[:, 0].tolist()
    assert result.response_top_token_ids == ids[:, 1:].tolist()
    assert result.response_top_logprobs == logprobs[:, 1:].tolist()
    assert result.token_versions == [0] * before + [1] * after
    assert result.response_text == tokenizer.decode(tokens.tolist())
