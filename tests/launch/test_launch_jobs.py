"""lpreg submit/status/logs/stop: addresses, tokens, errors and what a job is asked to run.

The job server is replaced only where the test is about lpreg's own logic (what it
passes to the client); the 401/403 answers come from a real HTTP server on loopback
through Ray's real client.
"""

from __future__ import annotations

import http.server
import os
import shlex
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from launch.cli.main import main as lpreg_main
from launch.cluster import jobs
from launch.cluster.jobs import (
    DEFAULT_ADDRESS,
    PROJECT_DIR,
    TokenLookup,
    auth_error_message,
    default_address,
    find_auth_token,
    normalize_address,
    recipe_argument,
    train_entrypoint,
)

TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
             "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No token or address from the machine running the tests; an empty home."""
    for name in TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    # Ray caches the token it found process-wide; an earlier test that started Ray in
    # this process would otherwise lend its token to a client that should have none.
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()
    yield home
    AuthenticationTokenLoader.instance().reset_cache()


# --- address -------------------------------------------------------------------------

def test_address_defaults_to_local_dashboard():
    assert default_address({}) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"


def test_address_prefers_api_server_variable():
    env = {"RAY_API_SERVER_ADDRESS": "http://head:8265", "RAY_ADDRESS": "http://other:8265"}
    assert default_address(env) == "http://head:8265"


def test_address_uses_ray_address_only_when_it_is_http():
    assert default_address({"RAY_ADDRESS": "https://head:443"}) == "https://head:443"
    # HOST:6379 names the GCS, not the job server.
    assert default_address({"RAY_ADDRESS": "10.0.0.1:6379"}) == DEFAULT_ADDRESS
    assert default_address({"RAY_ADDRESS": "auto"}) == DEFAULT_ADDRESS


def test_address_normalisation():
    assert normalize_address("head:8265/") == "http://head:8265"
    assert normalize_address(" http://head:8265 ") == "http://head:8265"
    with pytest.raises(jobs.JobCommandError, match="http"):
        normalize_address("ray://head:10001")


# --- token -------------------------------------------------------------------------

def test_token_from_environment_wins(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    lookup = find_auth_token({"RAY_AUTH_TOKEN": " from-env \n"}, home=tmp_path)
    assert (lookup.token, lookup.source) == ("from-env", "RAY_AUTH_TOKEN")
    assert lookup.headers() == {"Authorization": "Bearer from-env"}


def test_token_from_token_path_variable(tmp_path):
    path = tmp_path / "cluster.token"
    path.write_text("abc123\n")
    lookup = find_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home=tmp_path)
    assert lookup.token == "abc123"
    assert lookup.source == f"RAY_AUTH_TOKEN_PATH={path}"


def test_token_from_default_file(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("deadbeef")
    lookup = find_auth_token({}, home=tmp_path)
    assert lookup.token == "deadbeef"
    assert lookup.source == str(tmp_path / ".ray" / "auth_token")


def test_broken_token_path_does_not_fall_back_to_default_file(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("other-cluster")
    lookup = find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    assert lookup.token is None
    assert any("missing (no such file)" in place for place in lookup.searched)


def test_no_token_anywhere_lists_every_place(tmp_path):
    lookup = find_auth_token({}, home=tmp_path)
    assert lookup.token is None and lookup.headers() == {}
    assert lookup.searched == ["RAY_AUTH_TOKEN (not set)", "RAY_AUTH_TOKEN_PATH (not set)",
                               f"{tmp_path / '.ray' / 'auth_token'} (no such file)"]


def test_401_message_says_where_lpreg_looked_and_keeps_auth_on(tmp_path):
    lookup = find_auth_token({}, home=tmp_path)
    message = auth_error_message(401, "http://head:8265", lookup)
    assert "401 Unauthorized" in message and "http://head:8265" in message
    for place in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", str(tmp_path / ".ray" / "auth_token")):
        assert place in message
    assert "ray get-auth-token" in message
    assert "disabled" not in message and "RAY_AUTH_MODE" not in message


def test_403_message_names_the_token_source():
    lookup = TokenLookup("x", "RAY_AUTH_TOKEN", ["RAY_AUTH_TOKEN"])
    message = auth_error_message(403, "http://head:8265", lookup)
    assert "403 Forbidden" in message and "rejected the token" in message
    assert "RAY_AUTH_TOKEN" in message


class _RefusingHandler(http.server.BaseHTTPRequestHandler):
    """Answers like a Ray job server with token auth on."""

    def _answer(self) -> None:
        header = self.headers.get("Authorization")
        if not header:
            status, body = 401, b"Unauthorized: Missing authentication token"
        else:
            status, body = 403, b"Forbidden: Invalid authentication token"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


def _cli_in_fresh_process(args: list[str], env_home: Path, **env) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: Ray keeps its auth mode process-wide once any Ray has
    started in a process, so an in-process call would inherit earlier tests' state."""
    environ = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV}
    environ.update(HOME=str(env_home), **env)
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True,
                          text=True, env=environ, timeout=120)


@pytest.fixture
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_401_from_a_real_server_is_one_clear_line(clean_env, refusing_server):
    proc = _cli_in_fresh_process(["status", "raysubmit_x", "--address", refusing_server], clean_env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("lpreg: error:"))
    assert "401 Unauthorized" in line and "found no token" in line
    assert str(clean_env / ".ray" / "auth_token") in line


def test_403_from_a_real_server_names_the_token_source(clean_env, refusing_server, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-this-clusters-token")
    code = lpreg_main(["stop", "raysubmit_x", "--address", refusing_server])
    err = capsys.readouterr().err
    assert code == 1
    assert "403 Forbidden" in err and "taken from RAY_AUTH_TOKEN" in err


@pytest.fixture
def refused_address():
    """A bound socket that never listens refuses every connection; holding it keeps any
    other process from taking the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_server_is_one_clear_line(clean_env, refused_address):
    proc = _cli_in_fresh_process(["logs", "raysubmit_x", "--address", refused_address], clean_env)
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach a Ray job server" in proc.stderr and "Traceback" not in proc.stderr


def test_auth_on_without_a_token_is_not_reported_as_a_server_answer(clean_env, refused_address):
    # With RAY_AUTH_MODE=token and no token, Ray's client refuses before sending anything.
    proc = _cli_in_fresh_process(["status", "raysubmit_x", "--address", refused_address],
                                 clean_env, RAY_AUTH_MODE="token")
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("lpreg: error:"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "found no token" in line and "RAY_AUTH_MODE=token" in line
    assert "answered" not in line
    assert str(clean_env / ".ray" / "auth_token") in line


# --- what submit sends ------------------------------------------------------------

class FakeClient:
    """Records what lpreg asks of Ray's client (the client's own behaviour is Ray's)."""

    instances: list[FakeClient] = []

    def __init__(self, address: str, headers: dict[str, str], final: str = "SUCCEEDED") -> None:
        self.address, self.headers, self.final = address, headers, final
        self.submitted: dict = {}
        self.shipped: list[str] = []
        FakeClient.instances.append(self)

    def submit_job(self, **kwargs) -> str:
        self.submitted = kwargs
        # The package only lives until submit_job returns.
        self.shipped = zipfile.ZipFile(kwargs["runtime_env"]["working_dir"]).namelist()
        return kwargs.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id: str):
        for chunk in ("step 1/2\n", "step 2/2\n"):
            yield chunk

    def get_job_info(self, job_id: str):
        class Info:
            status = self.final
            message = "Job finished" if self.final == "SUCCEEDED" else "Job failed: exit 1"
        return Info()


@pytest.fixture
def fake_client(monkeypatch, clean_env):
    FakeClient.instances = []
    final = {"state": "SUCCEEDED"}

    def make(address, headers):
        return FakeClient(address, headers, final["state"])

    monkeypatch.setattr(jobs, "make_client", make)
    return final


def test_submit_passes_recipe_overrides_and_token(fake_client, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    code = lpreg_main(["submit", "-c", "lp_reg_on_policy", "trainer.total_steps=2",
                     "trainer.output_dir=/shared/runs", "rollout.num_workers=3",
                     "trainer.run_name=a b"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.strip() == "raysubmit_fake"
    (client,) = FakeClient.instances
    assert client.address == "http://head:8265"
    assert client.headers == {"Authorization": "Bearer tok"}
    entrypoint = client.submitted["entrypoint"]
    assert shlex.split(entrypoint) == [
        "python", "-m", "launch.cli", "train", "-c", "lp_reg_on_policy", "trainer.total_steps=2",
        "trainer.output_dir=/shared/runs", "rollout.num_workers=3", "trainer.run_name=a b"]
    assert client.submitted["runtime_env"]["working_dir"].endswith(".zip")
    assert "launch/cli/main.py" in client.shipped and "conf/recipes/lp_reg_on_policy.yaml" in client.shipped
    assert not any(name.startswith((".venv/", ".git/")) for name in client.shipped)


def test_submit_with_explicit_address_job_id_and_python(fake_client, capsys):
    code = lpreg_main(["submit", "--address", "head:8265", "--job-id", "mine-1",
                     "--python", "/opt/venv/bin/python", "trainer.output_dir=/abs"])
    assert code == 0
    (client,) = FakeClient.instances
    assert client.address == "http://head:8265"
    assert client.headers == {}  # no token anywhere: sent without, the server decides
    assert client.submitted["submission_id"] == "mine-1"
    assert client.submitted["entrypoint"].startswith("/opt/venv/bin/python -m launch.cli train ")
    assert capsys.readouterr().out.strip() == "mine-1"


@pytest.mark.parametrize("override", ["rollout.num_worker=2", "trainer.total_steps=many",
                                      "ray.placement_strategy=TIGHT"])
def test_submit_config_error_exits_2_before_contacting_anything(fake_client, override, capsys):
    code = lpreg_main(["submit", "--address", "http://127.0.0.1:1", override])
    err = capsys.readouterr().err
    assert code == 2
    assert override.split("=")[0] in err
    assert FakeClient.instances == []


def test_submit_follow_streams_logs_and_reports_success(fake_client, capsys):
    code = lpreg_main(["submit", "--follow", "trainer.output_dir=/abs"])
    out = capsys.readouterr()
    assert code == 0
    assert "step 1/2\nstep 2/2\n" in out.out
    assert "SUCCEEDED" in out.err


def test_submit_follow_exits_nonzero_when_the_job_fails(fake_client, capsys):
    fake_client["state"] = "FAILED"
    code = lpreg_main(["submit", "--follow", "trainer.output_dir=/abs"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().err


def test_submit_notes_relative_output_dir(fake_client, capsys):
    assert lpreg_main(["submit"]) == 0
    assert "trainer.output_dir=runs is relative" in capsys.readouterr().err


def test_status_prints_state(fake_client, capsys):
    assert lpreg_main(["status", "raysubmit_1"]) == 0
    assert capsys.readouterr().out.strip() == "raysubmit_1: SUCCEEDED (Job finished)"


# --- recipe and entrypoint ---------------------------------------------------------

def test_shipped_recipe_name_passes_unchanged():
    assert recipe_argument("grpo_on_policy", PROJECT_DIR) == "grpo_on_policy"
    assert recipe_argument(None, PROJECT_DIR) is None


def test_recipe_file_inside_project_becomes_relative(tmp_path):
    project = tmp_path / "proj"
    (project / "mine").mkdir(parents=True)
    (project / "mine" / "r.yaml").write_text("trainer:\n  total_steps: 2\n")
    assert recipe_argument(str(project / "mine" / "r.yaml"), project) == "mine/r.yaml"


def test_recipe_file_outside_project_is_a_config_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  total_steps: 2\n")
    with pytest.raises(jobs.ConfigError, match="outside"):
        recipe_argument(str(recipe), tmp_path / "proj")


def test_recipe_file_extending_a_file_outside_project_is_a_config_error(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (tmp_path / "base.yaml").write_text("trainer:\n  total_steps: 2\n")
    (project / "r.yaml").write_text("extends: [lp_reg_on_policy, ../base.yaml]\n")
    with pytest.raises(jobs.ConfigError, match="extends .*base.yaml, which is outside"):
        recipe_argument(str(project / "r.yaml"), project)
    (project / "r.yaml").write_text("extends: lp_reg_on_policy\n")
    assert recipe_argument(str(project / "r.yaml"), project) == "r.yaml"


def test_unknown_recipe_is_a_config_error():
    with pytest.raises(jobs.ConfigError, match="not found"):
        recipe_argument("no_such_recipe", PROJECT_DIR)


def test_entrypoint_quotes_values():
    command = train_entrypoint(None, ["trainer.run_name=a b", "model.path=$HOME/x"])
    assert shlex.split(command)[-2:] == ["trainer.run_name=a b", "model.path=$HOME/x"]


def test_upload_leaves_out_environment_caches_and_outputs(tmp_path):
    target = jobs.package_project(PROJECT_DIR, tmp_path)
    names = zipfile.ZipFile(target).namelist()
    assert "launch/cli/main.py" in names and "conf/schema.py" in names
    # The package launch/models/ ships; the top-level model cache does not.
    assert "launch/models/bootstrap.py" in names
    for banned in (".venv/", ".git/", "runs/", "models/"):
        assert not any(n.startswith(banned) for n in names), banned
    assert not any("__pycache__/" in n for n in names)
    assert Path(target).stat().st_size < 5 * 2**20
