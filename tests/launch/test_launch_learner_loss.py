"""Which failures of the learners' calls the loop treats as a lost learner rank."""

from __future__ import annotations

import pytest

from launch.cluster.remote import RunStopped
from launch.training.loop import LearnerLost, Trainer


class ActorDiedError(RuntimeError):
    """Named as Ray names its actor-death error; ``is_actor_death`` goes by the name."""


class Learners:
    def __init__(self, dead: str | None):
        self.dead = dead

    def name_of_failure(self, err: BaseException) -> str:
        return "learner-1, pid 42"

    def dead_rank(self) -> str | None:
        return self.dead


def trainer_with(dead: str | None) -> Trainer:
    trainer = Trainer.__new__(Trainer)
    trainer.learners = Learners(dead)
    return trainer


def fail_inside(trainer: Trainer, err: BaseException) -> None:
    with trainer._learner_loss("broadcasting weights"):
        raise err


def test_an_actor_death_is_a_lost_learner_named_by_its_rank():
    with pytest.raises(LearnerLost, match=r"died while broadcasting weights \(learner-1, pid 42\)"):
        fail_inside(trainer_with(None), ActorDiedError("gone"))


def test_a_surviving_ranks_error_is_a_lost_learner_when_a_peer_is_dead():
    # learner-0's broadcast or collective fails first; learner-1 is the one that died.
    with pytest.raises(LearnerLost, match=r"\(learner-1, pid 7\)") as lost:
        fail_inside(trainer_with("learner-1, pid 7"), RuntimeError("Connection closed by peer"))
    assert isinstance(lost.value.__cause__, RuntimeError)


def test_other_failures_pass_through_as_they_are():
    with pytest.raises(RuntimeError, match="bad batch"):
        fail_inside(trainer_with(None), RuntimeError("bad batch"))
    with pytest.raises(RunStopped):
        fail_inside(trainer_with("learner-0, pid 1"), RunStopped("replacements used up"))
