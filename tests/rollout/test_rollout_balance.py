import pytest

from launch.cluster.rollout_group import balance_prompts


@pytest.mark.parametrize("num_prompts,num_workers", [(8, 2), (7, 3), (2, 3), (0, 2), (16, 1)])
def test_every_prompt_goes_to_exactly_one_worker(num_prompts, num_workers):
    shards = balance_prompts(num_prompts, num_workers)
    assert len(shards) == num_workers
    assert sorted(i for shard in shards for i in shard) == list(range(num_prompts))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shards_are_contiguous_so_groups_stay_whole():
    assert balance_prompts(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_zero_workers_is_an_error():
    with pytest.raises(ValueError):
        balance_prompts(4, 0)
