"""`lpreg submit` against a real Ray head with its job server on loopback and token auth on.

The head is this test's own: started with ``ray start --head --block`` in a new session,
with its own temp folder and home directory, and stopped through its process group.
The head reads its token from ``~/.ray/auth_token`` of that home, written there by
``ray get-auth-token --generate``; lpreg, run with the same home and no token variables,
must find the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 900
HEAD_STOP_GRACE_S = 40  # a head drains for about 30 s on SIGTERM


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    # Caches stay where they are (DeepSpeed's compiled op, vLLM's cache); only the
    # home, and with it ~/.ray/auth_token, is the test's own.
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env["HOME"] = str(home)
    # As on a node where the venv is activated before `ray start`: the job's `python`.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Head:
    dashboard: str
    token: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen

    def lpreg(self, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=PROJECT_DIR,
                              env=env or self.env, capture_output=True, text=True, timeout=timeout)


def _wait_for_job_api(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"job API at {url} did not answer in {HEAD_START_TIMEOUT_S}s:\n"
                f"{log.read_text()[-3000:]}")


def _stop_head(process: subprocess.Popen) -> None:
    """SIGTERM to the head's own process group, then SIGKILL if it outstays the grace."""
    pgid = process.pid  # start_new_session: the head leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + HEAD_STOP_GRACE_S
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    base = tmp_path_factory.mktemp("cluster")
    home = base / "home"
    home.mkdir()
    # Ray's unix sockets live under the temp folder; keep its path short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="lpreg-ray-"))
    env = _clean_env(home)
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env,
                   check=True, capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    gcs, dashboard, client, agent = _free_ports(4)
    log = base / "head.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--port={gcs}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             "--num-cpus=4", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_api(url, token, process, log)
        yield Head(url, token, env, log, process)
    finally:
        _stop_head(process)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(head, tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    proc = head.lpreg(
        "submit", "--follow", "--address", head.dashboard,
        "trainer.total_steps=2", f"trainer.output_dir={out / 'runs'}", "trainer.run_name=cluster",
        "trainer.eval_every=-1", "rollout.num_workers=1", "learner.num_workers=1",
        "data.prompts_per_step=8", "rollout.samples_per_prompt=4",
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        timeout=JOB_TIMEOUT_S)
    return proc, out / "runs" / "cluster"


def test_submit_follow_trains_and_writes_metrics(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("raysubmit_")
    assert "run finished: 2 steps" in proc.stdout  # the job's own output, streamed
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("reward/mean" in m for m in metrics)


def test_status_and_logs_of_the_finished_job(head, trained):
    proc, _ = trained
    job_id = proc.stdout.splitlines()[0]
    status = head.lpreg("status", job_id, "--address", head.dashboard)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr
    logs = head.lpreg("logs", job_id, "--address", head.dashboard)
    assert logs.returncode == 0 and "run finished: 2 steps" in logs.stdout


def test_token_from_environment_variable(head, tmp_path):
    empty_home = tmp_path / "nobody"
    empty_home.mkdir()
    env = dict(head.env, HOME=str(empty_home), RAY_AUTH_TOKEN=head.token)
    answer = head.lpreg("status", "raysubmit_none", "--address", head.dashboard, env=env)
    # Authenticated, so the server's answer is about the job, not the token.
    assert answer.returncode == 1 and "no job 'raysubmit_none'" in answer.stderr, answer.stderr


def test_client_without_token_gets_a_clear_401(head, tmp_path):
    empty_home = tmp_path / "nobody"
    empty_home.mkdir()
    env = dict(head.env, HOME=str(empty_home))
    answer = head.lpreg("status", "raysubmit_none", "--address", head.dashboard, env=env)
    assert answer.returncode == 1
    assert "Traceback" not in answer.stderr
    assert "401 Unauthorized" in answer.stderr
    assert str(empty_home / ".ray" / "auth_token") in answer.stderr


def test_plain_ray_job_submit_runs_lpreg(head, tmp_path):
    # Ray's client hashes a working directory twice (package name, then upload); a
    # file saved in between breaks the job. A still copy keeps this test about lpreg.
    still = tmp_path / "project"
    shutil.copytree(PROJECT_DIR, still, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "models", "__pycache__", ".*_cache", ".gpu-wheels", ".bench"))
    # Ray's own client sends the token only when RAY_AUTH_MODE=token is set.
    env = dict(head.env, RAY_AUTH_MODE="token")
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard,
         "--working-dir", str(still),
         "--", "lpreg", "train", "--print-config", "trainer.total_steps=2"],
        env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "total_steps: 2" in output and "succeeded" in output


def test_stop_ends_a_running_job(head, tmp_path):
    submitted = head.lpreg("submit", "--address", head.dashboard, "trainer.total_steps=50",
                           f"trainer.output_dir={tmp_path}", "rollout.num_workers=1",
                           "data.prompts_per_step=8", "rollout.samples_per_prompt=4",
                           "learner.num_workers=1", "model.tiny.warm_start_steps=0",
                           f"model.cache_dir={tmp_path / 'models'}")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    stopped = head.lpreg("stop", job_id, "--address", head.dashboard)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stderr
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        state = head.lpreg("status", job_id, "--address", head.dashboard).stdout
        if "STOPPED" in state:
            break
        time.sleep(2)
    assert f"{job_id}: STOPPED" in state
