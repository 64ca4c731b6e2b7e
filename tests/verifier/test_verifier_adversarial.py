"""Hostile responses: bombs, injection attempts, empty, huge, binary and unicode junk.

Every case must end within its bound (one timeout plus slack) and have no side effects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verifier import MathVerifier

TIMEOUT_S = 2.0
# Slack for a busy 2-core machine; the bounds are sanity bounds, not benchmarks.
SLACK_S = 8.0


def injection_cases(target: Path) -> list[tuple[str, str, str, float]]:
    cmd = f"__import__('os').system('touch {target}')"
    return [
        ("inject-boxed", f"\\boxed{{{cmd}}}", "1", 0.0),
        ("inject-text", f"\\boxed{{\\text{{{cmd}}}}}", "1", 0.0),
        ("inject-answer-line", f"Answer: {cmd}", "1", 0.0),
        ("inject-eval", f'\\boxed{{eval("{cmd}")}}', "1", 0.0),
        ("inject-exec", f"\\boxed{{exec(open('{target}', 'w'))}}", "1", 0.0),
        ("inject-lambda", f"\\boxed{{(lambda: {cmd})()}}", "1", 0.0),
        (
            "inject-globals",
            f"\\boxed{{x.__class__.__init__.__globals__['os'].system('touch {target}')}}",
            "1",
            0.0,
        ),
        ("inject-sympify", f"\\boxed{{S('{cmd}')}}", "1", 0.0),
        ("inject-reference-side", "\\boxed{1}", cmd, 0.0),
        ("inject-inline-math", f"The answer is ${cmd}$.\nAnswer: ${cmd}$", "1", 0.0),
    ]


def junk_cases() -> list[tuple[str, str, str, float]]:
    binary = bytes(range(256)).decode("latin-1")
    return [
        ("bomb-power-tower", r"\boxed{9^{9^{9^{9}}}}", "1", 0.0),
        ("bomb-power-tower-sum", r"\boxed{9^{9^{9^{9}}} - 8^{8^{8^{8}}}}", "0", 0.0),
        ("bomb-nested-parens-10k", "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}", "1", 0.0),
        ("bomb-nested-braces-10k", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", 0.0),
        ("bomb-nested-frac-5k", "\\boxed{" + "\\frac{1}{" * 5_000 + "1" + "}" * 5_000 + "}", "1", 0.0),
        ("bomb-parens-depth-20", "\\boxed{" + "(" * 20 + "1" + ")" * 20 + "}", "2", 0.0),
        ("bomb-frac-by-zero", r"\boxed{\frac{1}{0}}", "1", 0.0),
        ("bomb-zero-over-zero", r"\boxed{\frac{0}{0}}", "0", 0.0),
        ("bomb-huge-integer", "\\boxed{" + "9" * 900 + "}", "1", 0.0),
        ("bomb-factorial", r"\boxed{(100000!)!}", "1", 0.0),
        ("huge-1mb-answer-at-end", "x" * 1_000_000 + " \\boxed{7}", "7", 1.0),
        ("huge-1mb-no-answer", "y " * 500_000, "7", 0.0),
        ("huge-1mb-inside-box", "\\boxed{" + "1" * 1_000_000 + "}", "1", 0.0),
        ("huge-many-boxes", "\\boxed{1} " * 100_000, "1", 1.0),
        ("huge-unclosed-boxes", "\\boxed{" * 100_000, "1", 0.0),
        ("empty", "", "1", 0.0),
        ("whitespace", " \n\t\r ", "1", 0.0),
        ("empty-box", "\\boxed{}", "1", 0.0),
        ("binary-junk", binary * 200, "1", 0.0),
        ("binary-in-box", "\\boxed{" + binary.replace("}", "") + "}", "1", 0.0),
        ("nul-in-box", "\\boxed{1\x002}", "12", 0.0),
        ("unicode-emoji", "\\boxed{😀🔥∑∫√∞}", "1", 0.0),
        ("unicode-rtl", "\\boxed{\u202e1\u202c}", "2", 0.0),
        ("unicode-combining", "\\boxed{" + "a\u0301" * 400 + "}", "1", 0.0),
        ("unicode-lone-surrogate", "\\boxed{\ud800}", "1", 0.0),
        ("latex-junk", r"\boxed{\begin{pmatrix}\end{array}\left(\right]\\\\&&\over\over}", "1", 0.0),
    ]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=2) as v:
        v.wait_ready(120)
        yield v


def _score_one(verifier, response, reference):
    start = time.perf_counter()
    report = verifier.score_batch_detailed([response], [reference])
    return report, time.perf_counter() - start


@pytest.mark.parametrize("case", junk_cases(), ids=lambda case: case[0])
def test_junk_case_ends_within_bound(verifier, case):
    _, response, reference, expected = case
    report, elapsed = _score_one(verifier, response, reference)
    assert report.scores == [expected]
    assert elapsed < TIMEOUT_S + SLACK_S
    assert report.errors == 0


def test_injection_creates_nothing(verifier, tmp_path):
    target = tmp_path / "pwned"
    cases = injection_cases(target)
    report = verifier.score_batch_detailed([c[1] for c in cases], [c[2] for c in cases])
    assert report.scores == [c[3] for c in cases]
    # Give any stray process a moment; nothing may appear.
    time.sleep(0.5)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_whole_adversarial_batch_costs_about_one_timeout(verifier, tmp_path):
    cases = junk_cases() + injection_cases(tmp_path / "pwned")
    # A few hundred ordinary responses around the hostile ones.
    normal = [
        (f"n{i}", f"so \\boxed{{\\frac{{{i}}}{{{i + 1}}}}}", f"{i}/{i + 1}", 1.0) for i in range(1, 200)
    ]
    cases = normal[:100] + cases + normal[100:]
    start = time.perf_counter()
    report = verifier.score_batch_detailed([c[1] for c in cases], [c[2] for c in cases])
    elapsed = time.perf_counter() - start
    assert report.scores == [c[3] for c in cases]
    assert report.timeouts >= 2  # the power towers
    assert elapsed < 3 * TIMEOUT_S + SLACK_S
    assert not (tmp_path / "pwned").exists()
    # Parked and timed-out workers are gone; the pool is back to its size and still works.
    assert len(verifier.worker_pids()) == 2
    assert verifier.score_batch([r"\boxed{\frac{2}{4}}"], ["0.5"]) == [1.0]


GUARD_PROBES = {
    "os.system": "os.system('touch {target}')",
    "subprocess": "subprocess.run(['touch', '{target}'])",
    "open-write": "open('{target}', 'w')",
    "os.open": "os.open('{target}', os.O_WRONLY | os.O_CREAT)",
    "socket": "socket.create_connection(('127.0.0.1', 9))",
    "os.remove": "os.remove('{existing}')",
}


@pytest.mark.parametrize("probe", sorted(GUARD_PROBES))
def test_worker_guard_blocks_side_effects(tmp_path, probe):
    """Second line of defence: even code running inside a math worker can't act."""
    target = tmp_path / "created"
    existing = tmp_path / "keep"
    existing.write_text("x")
    statement = GUARD_PROBES[probe].format(target=target, existing=existing)
    script = (
        "import os, socket, subprocess\n"
        "from verifier._worker import install_guard\n"
        "install_guard()\n"
        "open(os.devnull).read()\n"  # reading stays allowed
        "try:\n"
        f"    {statement}\n"
        "except PermissionError as exc:\n"
        "    print('blocked', exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "blocked" in out.stdout
    assert not target.exists()
    assert existing.exists()
