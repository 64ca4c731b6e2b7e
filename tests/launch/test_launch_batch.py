import pytest
import torch

from learner.batch import build_train_batch, shard_for_learners
from rollout.types import Sample


def sample(prompt, response, prompt_index=0):
    return Sample(prompt_index=prompt_index, prompt_token_ids=prompt,
                  response_token_ids=response,
                  response_logprobs=[-0.1 * (i + 1) for i in range(len(response))],
                  finish_reason="stop", weight_version=0, worker_index=0)


def test_layout_left_pads_prompts_and_right_pads_responses():
    batch = build_train_batch([sample([5, 6, 7], [8]), sample([9], [10, 11, 12])],
                              torch.tensor([1.0, -1.0]), pad_token_id=0)
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    # Real tokens are numbered from 0 whatever the padding.
    assert batch.position_ids[1, 2:].tolist() == [0, 1, 2, 3]
    assert batch.response_ids.tolist() == [[8, 0, 0], [10, 11, 12]]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch.rollout_log_probs[1].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_logprob_count_must_match_tokens():
    bad = sample([1], [2, 3])
    bad.response_logprobs = [-1.0]
    with pytest.raises(ValueError, match="log-probs"):
        build_train_batch([bad], torch.zeros(1), pad_token_id=0)


def test_shards_cover_each_mini_batch_and_carry_global_counts():
    samples = [sample([1], [2] * (i % 3 + 1), prompt_index=i // 2) for i in range(8)]
    batch = build_train_batch(samples, torch.arange(8.0), pad_token_id=0)
    shards = shard_for_learners(batch, num_mini_batches=2, num_ranks=2)
    assert len(shards) == 2
    for k in range(2):
        rows = sorted(a for shard in shards for a in shard.mini_batches[k].advantages.tolist())
        assert rows == [float(x) for x in range(4 * k, 4 * k + 4)]
        total = sum(shard.mini_batches[k].num_tokens() for shard in shards)
        assert all(shard.global_num_tokens[k] == total for shard in shards)
        assert all(shard.global_num_seqs[k] == 4 for shard in shards)


def test_indivisible_batch_is_refused():
    batch = build_train_batch([sample([1], [2])] * 6, torch.zeros(6), pad_token_id=0)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_for_learners(batch, num_mini_batches=2, num_ranks=2)
