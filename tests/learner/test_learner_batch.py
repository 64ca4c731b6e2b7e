"""The ragged driver -> learner batch, its padding per micro-batch, and the micro-batch plan."""

import random

import pytest
import torch

from learner.batch import (
    RaggedBatch,
    build_train_batch,
    padded_cost,
    shard_for_learners,
    split_by_tokens,
)
from rollout.types import Sample


def sample(prompt, response, prompt_index=0):
    return Sample(prompt_index=prompt_index, prompt_token_ids=prompt,
                  response_token_ids=response,
                  response_logprobs=[-0.1 * (i + 1) for i in range(len(response))],
                  finish_reason="stop", weight_version=0, worker_index=0)


def test_batch_travels_without_padding():
    batch = build_train_batch([sample([5, 6, 7], [8]), sample([9], [10, 11, 12])],
                              torch.tensor([1.0, -1.0]), pad_token_id=0)
    assert isinstance(batch, RaggedBatch)
    assert batch.prompt_tokens.tolist() == [5, 6, 7, 9]
    assert batch.response_tokens.tolist() == [8, 10, 11, 12]
    assert batch.prompt_lengths.tolist() == [3, 1] and batch.response_lengths.tolist() == [1, 3]
    assert batch.sequence_lengths() == [4, 4]
    assert batch.num_tokens() == 4.0


def test_layout_left_pads_prompts_and_right_pads_responses():
    batch = build_train_batch([sample([5, 6, 7], [8]), sample([9], [10, 11, 12])],
                              torch.tensor([1.0, -1.0]), pad_token_id=0).pad()
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    # Real tokens are numbered from 0 whatever the padding.
    assert batch.position_ids[1, 2:].tolist() == [0, 1, 2, 3]
    assert batch.response_ids.tolist() == [[8, 0, 0], [10, 11, 12]]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch.rollout_log_probs[1].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_each_micro_batch_pads_only_to_its_own_longest():
    batch = build_train_batch([sample([1] * 2, [2] * 3), sample([1] * 9, [2] * 40), sample([1], [2])],
                              torch.zeros(3), pad_token_id=0)
    assert batch.select([0, 2]).pad().input_ids.shape == (2, 2 + 3)
    assert batch.pad().input_ids.shape == (3, 9 + 40)
    picked = batch.select([2, 0])
    assert picked.prompt_tokens.tolist() == [1, 1, 1] and picked.response_lengths.tolist() == [1, 3]


def test_empty_response_keeps_one_masked_column():
    padded = build_train_batch([sample([1, 2], [])], torch.zeros(1), pad_token_id=0).pad()
    assert padded.response_mask.tolist() == [[0.0]]
    assert padded.attention_mask.tolist() == [[1, 1, 0]]


def test_logprob_count_must_match_tokens():
    bad = sample([1], [2, 3])
    bad.response_logprobs = [-1.0]
    with pytest.raises(ValueError, match="log-probs"):
        build_train_batch([bad], torch.zeros(1), pad_token_id=0)


@pytest.mark.parametrize("budget", [0, 6])
def test_shards_cover_each_mini_batch_and_carry_global_counts(budget):
    samples = [sample([1], [2] * (i % 3 + 1), prompt_index=i // 2) for i in range(8)]
    batch = build_train_batch(samples, torch.arange(8.0), pad_token_id=0)
    shards = shard_for_learners(batch, num_mini_batches=2, num_ranks=2, micro_batch_size=1,
                                max_tokens_per_micro_batch=budget)
    assert len(shards) == 2
    for k in range(2):
        rows = sorted(a for shard in shards for micro in shard.mini_batches[k]
                      for a in micro.advantages.tolist())
        assert rows == [float(x) for x in range(4 * k, 4 * k + 4)]
        total = sum(micro.num_tokens() for shard in shards for micro in shard.mini_batches[k])
        assert all(shard.global_num_tokens[k] == total for shard in shards)
        assert all(shard.global_num_seqs[k] == 4 for shard in shards)
        # Same number of sequences and of micro-batches on every rank.
        assert len({sum(len(m) for m in shard.mini_batches[k]) for shard in shards}) == 1
        assert len({len(shard.mini_batches[k]) for shard in shards}) == 1


def test_count_based_plan_keeps_todays_rows():
    batch = build_train_batch([sample([1], [2] * (i + 1)) for i in range(8)], torch.arange(8.0),
                              pad_token_id=0)
    shards = shard_for_learners(batch, 1, 2, micro_batch_size=3)
    assert [m.advantages.tolist() for m in shards[0].mini_batches[0]] == [[0.0, 2.0, 4.0], [6.0]]
    assert [m.advantages.tolist() for m in shards[1].mini_batches[0]] == [[1.0, 3.0, 5.0], [7.0]]
    # 0: the whole share is one micro-batch.
    (whole,) = shard_for_learners(batch, 1, 1)[0].mini_batches[0]
    assert len(whole) == 8


def test_indivisible_batch_is_refused():
    batch = build_train_batch([sample([1], [2])] * 6, torch.zeros(6), pad_token_id=0)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_for_learners(batch, num_mini_batches=2, num_ranks=2)


def long_tailed_batch(n, seed=0, cap=2000):
    rng = random.Random(seed)
    samples = [sample([1] * rng.randint(5, 30), [2] * min(cap, max(1, int(rng.lognormvariate(4.5, 1.0)))))
               for _ in range(n)]
    return build_train_batch(samples, torch.zeros(n), pad_token_id=0)


def micro_costs(micro_batches):
    return [padded_cost(list(zip(m.prompt_lengths.tolist(), m.response_lengths.tolist(), strict=True)))
            for m in micro_batches]


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_token_budget_bounds_padded_tokens_with_one_count_for_all_ranks(num_ranks):
    batch = long_tailed_batch(64)
    budget = 2500
    shards = shard_for_learners(batch, 2, num_ranks, max_tokens_per_micro_batch=budget)
    longest = max(batch.sequence_lengths())
    for k in range(2):
        counts = {len(shard.mini_batches[k]) for shard in shards}
        assert len(counts) == 1
        for shard in shards:
            for micro, cost in zip(shard.mini_batches[k], micro_costs(shard.mini_batches[k]), strict=True):
                assert len(micro) > 0
                # Over budget only as a sequence alone in its micro-batch.
                assert cost <= budget or len(micro) == 1
                assert cost <= max(budget, longest + 30)


def test_token_budget_groups_by_length_and_pads_less_than_counts():
    batch = long_tailed_batch(64, seed=1)
    (by_tokens,) = shard_for_learners(batch, 1, 1, max_tokens_per_micro_batch=4000)
    count = len(by_tokens.mini_batches[0])
    (by_count,) = shard_for_learners(batch, 1, 1, micro_batch_size=-(-64 // count))
    assert sum(micro_costs(by_tokens.mini_batches[0])) < 0.7 * sum(micro_costs(by_count.mini_batches[0]))


def test_a_sequence_over_the_budget_gets_a_micro_batch_of_its_own():
    batch = build_train_batch([sample([1], [2] * 100), sample([1], [2] * 3), sample([1], [2] * 4)],
                              torch.zeros(3), pad_token_id=0)
    (shard,) = shard_for_learners(batch, 1, 1, max_tokens_per_micro_batch=20)
    assert sorted(len(m) for m in shard.mini_batches[0]) == [1, 2]
    assert [len(m) for m in shard.mini_batches[0] if m.response_lengths.max() == 100] == [1]


def test_split_by_tokens_gives_exactly_the_count_asked():
    lengths = [(3, r) for r in (50, 40, 5, 5, 4, 3, 2, 1)]
    for count in range(1, 9):
        groups = split_by_tokens(lengths, count)
        assert len(groups) == count and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(8))
    with pytest.raises(ValueError):
        split_by_tokens(lengths, 9)
