"""The worker pool: killed workers, timeouts, plugins, lifecycle and the reported metrics."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from conf.schema import VerifierConfig
from verifier import MathVerifier, ScoringPool, Status

SLACK_S = 8.0  # for a busy 2-core machine

PLUGIN_SOURCE = '''
import math
import time


def reward(response: str, answer: str) -> float:
    if response.startswith("SLEEP "):
        time.sleep(float(response.split()[1]))
    elif response == "HANG":
        time.sleep(1000)
    elif response == "SPIN":
        while True:
            pass
    elif response == "RAISE":
        raise RuntimeError("boom")
    elif response == "JUNK":
        return "not a number"
    elif response == "NAN":
        return math.nan
    elif response == "BOOL":
        return True
    return 1.0 if response.split()[-1] == answer else 0.0


NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def plugin_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plugins")
    (directory / "lpreg_test_rewards.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    sys.path.insert(0, str(directory))
    yield "lpreg_test_rewards"
    sys.path.remove(str(directory))
    sys.modules.pop("lpreg_test_rewards", None)


@pytest.fixture(scope="module")
def plugin_verifier(plugin_module):
    with MathVerifier(timeout_s=1.5, num_workers=2, reward_fn=f"{plugin_module}:reward") as v:
        v.wait_ready(120)
        yield v


@pytest.fixture(scope="module")
def math_verifier():
    with MathVerifier(timeout_s=2.0, num_workers=2) as v:
        v.wait_ready(120)
        yield v


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_dead(pids, timeout_s=10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


# ---- math verifier -----------------------------------------------------------------


def test_scores_and_metrics(math_verifier):
    responses = [r"\boxed{\frac{1}{2}}", "Answer: 0.5", r"\boxed{3}", "no answer here"]
    report = math_verifier.score_batch_detailed(responses, ["0.5", r"\frac12", "4", "1"])
    assert report.scores == [1.0, 1.0, 0.0, 0.0]
    assert report.no_answer == 1
    assert report.timeouts == 0
    metrics = report.metrics()
    assert set(metrics) == {
        "verifier/timeouts",
        "verifier/no_answer_frac",
        "verifier/errors",
        "verifier/score_s",
    }
    assert metrics["verifier/no_answer_frac"] == pytest.approx(0.25)
    assert metrics["verifier/score_s"] > 0
    assert math_verifier.score_batch(responses, ["0.5", r"\frac12", "4", "1"]) == report.scores


def test_usable_from_a_thread(math_verifier):
    # The driver may score from a non-main thread, where signal-based timeouts fail.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(math_verifier.score_batch([r"\boxed{2\sqrt{2}}"], [r"\sqrt{8}"]))
    )
    thread.start()
    thread.join(60)
    assert results == [[1.0]]


def test_empty_batch_and_length_mismatch(math_verifier):
    report = math_verifier.score_batch_detailed([], [])
    assert report.scores == []
    assert report.metrics()["verifier/no_answer_frac"] == 0.0
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        math_verifier.score_batch(["a", "b"], ["a"])


def test_survives_workers_killed_between_batches(math_verifier):
    old = math_verifier.worker_pids()
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    assert _wait_dead(old)
    responses = [rf"\boxed{{\dfrac{{{i}}}{{{i + 1}}}}}" for i in range(1, 40)]
    answers = [f"{i}/{i + 1}" for i in range(1, 40)]
    report = math_verifier.score_batch_detailed(responses, answers)
    assert report.scores == [1.0] * 39
    assert report.errors == 0
    new = math_verifier.worker_pids()
    assert len(new) == 2 and not set(new) & set(old)
    # And again: the replacements work too.
    os.kill(new[0], signal.SIGKILL)
    assert math_verifier.score_batch([r"\boxed{\sqrt{8}}"], [r"2\sqrt{2}"]) == [1.0]


def test_bombs_run_concurrently_and_count_as_timeouts(math_verifier):
    timeout = math_verifier.timeout_s
    bombs = [rf"\boxed{{{k}^{{{k}^{{{k}^{{{k}}}}}}}}}" for k in (7, 8, 9, 11, 12)]
    normal = [rf"\boxed{{\frac{{{i}}}{{{i + 2}}}}}" for i in range(1, 61)]
    responses = normal[:30] + bombs + normal[30:]
    answers = [f"{i}/{i + 2}" for i in range(1, 31)] + ["1"] * 5 + [f"{i}/{i + 2}" for i in range(31, 61)]
    start = time.perf_counter()
    report = math_verifier.score_batch_detailed(responses, answers)
    elapsed = time.perf_counter() - start
    assert report.timeouts == 5
    assert report.scores == [1.0] * 30 + [0.0] * 5 + [1.0] * 30
    # Serially, 5 bombs on 2 workers would take >= 3 timeouts; parking keeps it near one.
    assert elapsed < 3 * timeout + SLACK_S
    assert len(math_verifier.worker_pids()) == 2


def test_repeated_bomb_costs_one_timeout_but_counts_each_sample(math_verifier):
    bomb = r"\boxed{9^{9^{9^{9}}}}"
    start = time.perf_counter()
    report = math_verifier.score_batch_detailed([bomb] * 6, ["1"] * 6)
    assert report.timeouts == 6
    assert time.perf_counter() - start < math_verifier.timeout_s + SLACK_S


def test_format_penalty():
    with MathVerifier(timeout_s=5.0, num_workers=1, format_penalty=0.5) as v:
        report = v.score_batch_detailed(["nothing", r"\boxed{2}", r"\boxed{3}"], ["2", "2", "2"])
    assert report.scores == [-0.5, 1.0, 0.0]
    assert report.no_answer == 1


def test_from_config_and_close_terminates_workers():
    cfg = VerifierConfig(timeout_s=3.0, num_workers=2, boxed_commands=["fbox"], answer_line_fallback=False)
    v = MathVerifier.from_config(cfg)
    assert v.timeout_s == 3.0 and v.boxed_commands == ("fbox",)
    assert v.score_batch([r"\boxed{1} \fbox{2}", "Answer: 2"], ["2", "2"]) == [1.0, 0.0]
    pids = v.worker_pids()
    zygote_pid = v._pool._zygotes[0].proc.pid
    v.close()
    v.close()  # idempotent
    assert _wait_dead([*pids, zygote_pid])
    with pytest.raises(RuntimeError, match="closed"):
        v.score_batch([r"\boxed{1}"], ["1"])


def test_zygote_killed_externally_is_restarted(math_verifier):
    pool = math_verifier._pool
    old_workers = math_verifier.worker_pids()
    os.kill(pool._zygotes[0].proc.pid, signal.SIGKILL)  # its workers die with it
    responses = [rf"\boxed{{{i}.5}}" for i in range(1, 20)]
    answers = [rf"\frac{{{2 * i + 1}}}{{2}}" for i in range(1, 20)]
    report = math_verifier.score_batch_detailed(responses, answers)
    assert report.scores == [1.0] * 19
    assert report.errors == 0 and report.timeouts == 0
    assert _wait_dead(old_workers)


# ---- plugins -------------------------------------------------------------------------


def test_plugin_rewards_and_errors(plugin_verifier):
    responses = ["x 7", "x 8", "RAISE", "JUNK", "NAN", "BOOL", "no answer"]
    report = plugin_verifier.score_batch_detailed(responses, ["7", "7", "7", "7", "7", "7", "7"])
    assert report.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert report.errors == 3
    assert report.no_answer == 0  # the plugin owns the reward; no extraction
    assert any("boom" in message for message in report.error_messages)


def test_plugin_timeouts_are_concurrent(plugin_verifier):
    timeout = plugin_verifier.timeout_s
    responses = ["HANG", "x 1", "SPIN", "x 2", "SLEEP 100", "x 3"]
    start = time.perf_counter()
    report = plugin_verifier.score_batch_detailed(responses, ["1", "1", "1", "2", "1", "3"])
    elapsed = time.perf_counter() - start
    assert report.scores == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert report.timeouts == 3
    assert elapsed < 3 * timeout + SLACK_S


def test_worker_killed_mid_sample_is_retried(plugin_module):
    # Slow samples, no parking: the kill below must hit a worker in the middle of one.
    spec = f"{plugin_module}:reward"
    with MathVerifier(timeout_s=20.0, num_workers=2, reward_fn=spec, park_after_s=15) as v:
        v.wait_ready(120)
        responses = [f"SLEEP 0.3 {i}" for i in range(8)]
        answers = [str(i) for i in range(8)]
        killed: list[int] = []

        def killer():
            time.sleep(0.45)
            pid = v.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        thread = threading.Thread(target=killer)
        thread.start()
        report = v.score_batch_detailed(responses, answers)
        thread.join()
        assert killed and killed[0] not in v.worker_pids()
        assert report.scores == [1.0] * 8
        assert report.errors == 0 and report.timeouts == 0
        assert len(v.worker_pids()) == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("lpreg_test_rewards:missing", "has no attribute 'missing'"),
        ("lpreg_test_rewards:NOT_CALLABLE", "is not callable"),
        ("lpreg_test_rewards", "expected 'package.module:function'"),
        ("a:b:c", "expected 'package.module:function'"),
    ],
)
def test_bad_plugin_spec_fails_at_construction(plugin_module, spec, message):
    with pytest.raises(ValueError, match="verifier.reward_fn=") as info:
        MathVerifier(reward_fn=spec)
    assert message in str(info.value)
    assert spec in str(info.value)


def test_plugin_with_format_penalty_is_rejected(plugin_module):
    with pytest.raises(ValueError, match="format_penalty"):
        MathVerifier(reward_fn=f"{plugin_module}:reward", format_penalty=0.1)


# ---- the pool directly ---------------------------------------------------------------


def test_pool_outcomes_keep_order_and_status(plugin_module):
    pool = ScoringPool(num_workers=2, timeout_s=1.0, mode="plugin", reward_fn_spec=f"{plugin_module}:reward")
    try:
        items = [("x 1", "1"), ("HANG", "1"), ("x 2", "3"), ("RAISE", "1")]
        outcomes = pool.run(items)
        assert [o.status for o in outcomes] == [Status.OK, Status.TIMEOUT, Status.OK, Status.ERROR]
        assert [o.score for o in outcomes] == [1.0, 0.0, 0.0, 0.0]
    finally:
        pool.close()
