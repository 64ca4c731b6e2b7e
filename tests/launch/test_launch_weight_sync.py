"""The object-store push: a failed export is the learners' failure, never the workers'."""

from __future__ import annotations

import pytest

from launch.training.weight_sync import ObjectStoreWeightSync


class Call:
    def __init__(self, result):
        self.result = result

    def remote(self, *args):
        return self.result


class Rank0:
    def __init__(self, stats):
        self.last_export_stats = Call(stats)


class Learners:
    def __init__(self, stats, exports):
        self.rank0 = Rank0(stats)
        self.exports = exports

    def export_weights_refs(self):
        return list(self.exports)


class Pool:
    """Refs are the values themselves; an exception among them fails the wait."""

    def __init__(self):
        self.pushed = []
        self.load_current_weights = None

    def wait_refs(self, refs, timeout_s, what):
        for ref in refs:
            if isinstance(ref, BaseException):
                raise ref
        return list(refs)

    def push_weights(self, weights, version, partial):
        self.pushed.append((weights, version))


def test_the_workers_load_an_export_only_once_it_is_whole():
    pool = Pool()
    sync = ObjectStoreWeightSync(Learners((3, 120), ["weights", None]), pool, 10, False)
    report = sync.push(4)
    assert pool.pushed == [("weights", 4)]
    assert (report.num_tensors, report.num_bytes) == (3, 120)
    assert sync.current == ("weights", 4)


@pytest.mark.parametrize("failure", ["rank 0", "rank 1"])
def test_a_failed_export_reaches_no_worker(failure):
    pool = Pool()
    stats = RuntimeError("learner-0: its last weight export did not complete")
    lost = RuntimeError("learner-1 died in the gathers")
    learners = (Learners(stats, ["weights", None]) if failure == "rank 0"
                else Learners((3, 120), ["weights", lost]))
    sync = ObjectStoreWeightSync(learners, pool, 10, False)
    with pytest.raises(RuntimeError):
        sync.push(5)
    assert pool.pushed == [] and sync.current is None  # a replacement would not load it either


def test_a_learner_reports_an_unfinished_export():
    from learner.actor import Learner

    learner = Learner.__new__(Learner)
    learner.rank, learner._export_stats = 0, None
    with pytest.raises(RuntimeError, match="learner-0: its last weight export did not complete"):
        learner.last_export_stats()
