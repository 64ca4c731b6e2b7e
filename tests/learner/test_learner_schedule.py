"""The learning-rate schedule: values at chosen steps, and a resume that continues it."""

import math

import pytest
import torch

from learner.schedule import LR_SCHEDULERS, lambda_lr, lr_multiplier


def mult(step, scheduler, **kw):
    return lr_multiplier(step, scheduler=scheduler, **kw)


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_warmup_climbs_linearly_from_zero_then_reaches_one(scheduler):
    kw = {"warmup_steps": 4, "total_steps": 104, "min_lr_ratio": 0.1}
    assert [mult(n, scheduler, **kw) for n in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert mult(4, scheduler, **kw) == pytest.approx(1.0)


def test_constant_and_unknown_length_stay_at_one():
    assert all(mult(n, "constant", total_steps=10, min_lr_ratio=0.5) == 1.0 for n in range(20))
    for scheduler in ("linear", "cosine"):  # total 0: length unknown
        assert mult(10**6, scheduler, warmup_steps=3, min_lr_ratio=0.5) == 1.0


def test_linear_decays_to_the_floor():
    kw = {"warmup_steps": 0, "total_steps": 100, "min_lr_ratio": 0.2}
    assert mult(0, "linear", **kw) == pytest.approx(1.0)
    assert mult(50, "linear", **kw) == pytest.approx(0.2 + 0.8 * 0.5)
    assert mult(75, "linear", **kw) == pytest.approx(0.2 + 0.8 * 0.25)
    assert mult(100, "linear", **kw) == pytest.approx(0.2)
    assert mult(500, "linear", **kw) == pytest.approx(0.2)


def test_cosine_after_warmup():
    kw = {"warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.0}
    assert mult(10, "cosine", **kw) == pytest.approx(1.0)
    assert mult(35, "cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert mult(60, "cosine", **kw) == pytest.approx(0.5)
    assert mult(110, "cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert mult(60, "cosine", **{**kw, "min_lr_ratio": 0.1}) == pytest.approx(0.1 + 0.9 * 0.5)


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="constant"):
        mult(0, "step")


def _optimizer(lr=0.1):
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=lr)


def _run(optimizer, scheduler, steps):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    return rates


def test_lambda_lr_uses_the_multiplier_and_resumes_where_it_left_off():
    kw = {"scheduler": "cosine", "warmup_steps": 2, "total_steps": 10, "min_lr_ratio": 0.1}
    opt = _optimizer()
    sched = lambda_lr(opt, **kw)
    straight = _run(opt, sched, 10)
    assert straight == pytest.approx([0.1 * lr_multiplier(n, **kw) for n in range(10)])

    opt = _optimizer()
    sched = lambda_lr(opt, **kw)
    first = _run(opt, sched, 4)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    opt = _optimizer()
    sched = lambda_lr(opt, **kw)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert first + _run(opt, sched, 6) == pytest.approx(straight)
