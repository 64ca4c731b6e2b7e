"""The tool sandbox against hostile programs, in both modes where bwrap runs.

Each program must be stopped by its limit within seconds, harm nobody (the test process,
a bystander process, files it may not read), leave no process of its user running, and
leave nothing behind outside its temporary directory, which is gone afterwards too.
Small limits keep every case within a few seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import tracemalloc
import uuid

import pytest

from conf.errors import ConfigError
from conf.schema import ToolConfig
from rollout.tools.sandbox import UID_BASE, WORLD_WRITABLE, Sandbox, ToolStatus, _status_uid

TIMEOUT_S = 2.0
LIMITS = dict(timeout_s=TIMEOUT_S, cpu_time_s=1, memory_mb=256, max_processes=16, max_file_mb=4,
              max_output_chars=400, max_concurrency=2)
AS_ROOT = os.geteuid() == 0
HAS_BWRAP = shutil.which("bwrap") is not None


@pytest.fixture(scope="module", params=["rlimits", "bwrap"])
def sandbox(request, tmp_base):
    box = make_sandbox(request.param, tmp_base)
    assert box.mode == request.param
    yield box
    box.close()


def make_sandbox(mode: str, tmp_base: str, **overrides) -> Sandbox:
    """A sandbox in ``mode``; bwrap tests are skipped, saying why, where it cannot run."""
    if mode == "bwrap" and not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed (make install installs it)")
    try:
        return Sandbox(ToolConfig(sandbox=mode, tmp_dir=tmp_base, **(LIMITS | overrides)))
    except ConfigError as err:
        if mode == "bwrap" and "bwrap does not run here" in str(err):
            pytest.skip(str(err))
        raise


def sandbox_processes(box: Sandbox) -> list[str]:
    """Live processes of any of the sandbox's users."""
    if not box.switch_user:
        return []
    uids = {box.uid(slot) for slot in range(box.cfg.max_concurrency)}
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _status_uid(pid) in uids]


def stray_files() -> list[str]:
    """Anything a sandbox user of this process owns in the places every user may write
    (not another process's: other work on the machine may run programs meanwhile)."""
    ours = range(UID_BASE + (os.getpid() << 8), UID_BASE + ((os.getpid() + 1) << 8))
    found = []
    for base in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid in ours:
                    found.append(entry.path)
            except OSError:
                pass
    return found


def run(box: Sandbox, code: str, tmp_base: str):
    result = box.run(code)
    assert sandbox_processes(box) == [], "a process of the program outlived it"
    assert os.listdir(tmp_base) == [], "the private directory was not removed"
    if AS_ROOT:
        assert stray_files() == []
    return result


def test_a_plain_program(sandbox, tmp_base):
    result = run(sandbox, "print(6 * 7)", tmp_base)
    assert (result.observation, result.status, result.exit_code) == ("42\n", ToolStatus.OK, 0)
    assert run(sandbox, "x = 1", tmp_base).observation == "[no output]"


def test_an_exception_shows_the_end_of_its_traceback(sandbox, tmp_base):
    result = run(sandbox, "print('before')\n1 / 0\n", tmp_base)
    assert result.status is ToolStatus.ERROR and result.exit_code == 1
    lines = result.observation.splitlines()
    assert lines[0] == "before"
    assert lines[-2:] == ["ZeroDivisionError: division by zero", "[exit code 1]"]
    assert run(sandbox, "import sys; sys.exit(3)", tmp_base).observation == "[exit code 3]"


def test_an_infinite_loop_is_stopped(sandbox, tmp_base):
    result = run(sandbox, "while True:\n    pass\n", tmp_base)
    # The CPU limit (1 s) ends it, or, on a machine too busy to give it 1 CPU second in
    # time, the wall clock.
    assert result.status in (ToolStatus.KILLED, ToolStatus.TIMEOUT), result
    assert result.wall_s < TIMEOUT_S + 1.5
    if result.status is ToolStatus.KILLED:
        assert result.observation == "[killed: over the CPU time limit of 1 s]"


def test_a_sleeping_program_times_out_with_what_it_printed(sandbox, tmp_base):
    result = run(sandbox, "import time\nprint('started', flush=True)\ntime.sleep(100)\n", tmp_base)
    assert result.status is ToolStatus.TIMEOUT and result.exit_code is None
    assert result.observation == "started\n[timed out after 2 s]"
    assert TIMEOUT_S <= result.wall_s < TIMEOUT_S + 1.5


def test_a_fork_bomb_is_contained_and_cleaned_up(sandbox, tmp_base):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run(sandbox, bomb, tmp_base)
    assert result.status in (ToolStatus.TIMEOUT, ToolStatus.KILLED)
    assert result.wall_s < TIMEOUT_S + 3
    assert run(sandbox, "print('next')", tmp_base).observation == "next\n"


@pytest.mark.skipif(not AS_ROOT, reason="the process limit needs a user of its own")
def test_the_process_limit_holds(sandbox, tmp_base):
    code = ("import os, time\nfor n in range(100):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n    except OSError:\n"
            "        break\nprint(n)\n")
    result = run(sandbox, code, tmp_base)  # the sleeping children do not outlive it
    assert result.observation == f"{LIMITS['max_processes'] - 1}\n"


def test_a_memory_bomb_hits_the_address_space_limit(sandbox, tmp_base):
    # bytes(n) maps fresh zero pages without touching them: the limit, not the machine's
    # speed at writing memory, decides when this ends.
    result = run(sandbox, "hog = []\nwhile True:\n    hog.append(bytes(16 << 20))\n", tmp_base)
    assert result.status in (ToolStatus.ERROR, ToolStatus.KILLED), result
    assert "MemoryError" in result.observation or result.status is ToolStatus.KILLED
    assert result.wall_s < TIMEOUT_S


def test_100_mb_of_output_is_cut_without_being_held(sandbox, tmp_base):
    code = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\nprint('END')\n"
    tracemalloc.start()
    try:
        result = run(sandbox, code, tmp_base)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes held for 100 MB of output"
    assert result.status is ToolStatus.OK and result.truncated
    head, marker, tail = result.observation.split("\n", 2)
    assert head == "x" * 200 and tail == "x" * 196 + "END\n"
    assert marker == f"... [output truncated: {100 * (1 << 20) + 4 - 400} characters omitted] ..."


def test_files_outside_its_reach_stay_unread(sandbox, tmp_base):
    fd, secret_path = tempfile.mkstemp(prefix="lpreg-secret-", dir="/tmp")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write("the-secret-token")
    try:
        code = (f"for path in ('/etc/shadow', {secret_path!r}):\n"
                "    try:\n        print(open(path).read())\n"
                "    except OSError as err:\n        print(type(err).__name__)\n")
        result = run(sandbox, code, tmp_base)
    finally:
        os.unlink(secret_path)
    assert "the-secret-token" not in result.observation and "root:" not in result.observation
    # Without root everything runs as the caller, who may read its own files.
    if AS_ROOT:
        expected = "FileNotFoundError" if sandbox.mode == "bwrap" else "PermissionError"
        assert result.observation == f"{expected}\n{expected}\n"


def test_no_network(sandbox, tmp_base):
    if not sandbox.network_isolated:
        pytest.skip("no network namespace here (rlimits mode without root)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    print('connected')\nexcept OSError as err:\n    print('refused', err.errno)\n")
        result = run(sandbox, code, tmp_base)
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.observation.startswith("refused"), result.observation


def test_it_cannot_kill_its_parent_or_anyone_else(sandbox, tmp_base):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = ("import os, signal\n"
                f"for pid in (os.getppid(), {bystander.pid}, {os.getpid()}, -1):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                "    except OSError as err:\n        print(type(err).__name__)\n"
                "print('still here')\n")
        result = run(sandbox, code, tmp_base)
        assert bystander.poll() is None, "the program killed a process of the host"
    finally:
        bystander.kill()
        bystander.wait()
    assert result.observation.endswith("still here\n")
    if AS_ROOT:
        assert "PermissionError" in result.observation or "ProcessLookupError" in result.observation


def test_a_huge_file_stops_at_the_file_size_limit(sandbox, tmp_base):
    code = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n"
    result = run(sandbox, code, tmp_base)
    assert result.status is ToolStatus.ERROR
    assert "File too large" in result.observation or "No space left" in result.observation
    assert result.wall_s < TIMEOUT_S


@pytest.mark.skipif(not AS_ROOT, reason="without root the program runs as the caller")
def test_nothing_is_left_where_every_user_may_write(sandbox, tmp_base):
    name = f"lpreg-escape-{uuid.uuid4().hex}"
    places = [os.path.join(base, name) for base in ("/tmp", "/var/tmp", "/dev/shm")]
    code = (f"for path in {places!r}:\n    try:\n"
            "        open(path, 'w').write('x')\n    except OSError:\n        pass\n")
    run(sandbox, code, tmp_base)
    assert [p for p in places if os.path.exists(p)] == []


def test_a_daemon_does_not_outlive_the_program(sandbox, tmp_base):
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\n"
            "print('parent done')\n")
    result = run(sandbox, code, tmp_base)  # run() checks that no process is left
    assert result.observation == "parent done\n" and result.wall_s < TIMEOUT_S


def test_an_environment_of_its_own(sandbox, tmp_base, monkeypatch):
    monkeypatch.setenv("LPREG_TEST_SECRET", "do-not-leak")
    code = "import os\nprint(sorted(os.environ))\nprint(os.getuid())\nprint(os.getcwd())\n"
    env, uid, cwd = run(sandbox, code, tmp_base).observation.splitlines()
    assert "LPREG_TEST_SECRET" not in env
    if AS_ROOT:
        assert int(uid) >= UID_BASE
    assert cwd == "/tmp" if sandbox.mode == "bwrap" else cwd.startswith(tmp_base)


def test_a_closed_sandbox_refuses_work(tmp_base):
    box = Sandbox(ToolConfig(sandbox="rlimits", tmp_dir=tmp_base, **LIMITS))
    box.close()
    assert box.run("print(1)").status is ToolStatus.FAILED


@pytest.mark.skipif(not AS_ROOT, reason="only a switch to another user needs a reachable directory")
def test_a_temporary_directory_the_user_cannot_reach_is_refused():
    closed = tempfile.mkdtemp()  # mode 0700
    inner = os.path.join(closed, "open")
    os.mkdir(inner)
    os.chmod(inner, 0o777)
    try:
        with pytest.raises(ConfigError, match=f"tool.tmp_dir.*since {closed} is closed"):
            Sandbox(ToolConfig(sandbox="rlimits", tmp_dir=inner, **LIMITS))
    finally:
        shutil.rmtree(closed)


def test_an_interpreter_it_cannot_run_is_refused(tmp_base):
    with pytest.raises(ConfigError, match="tool.python"):
        Sandbox(ToolConfig(sandbox="rlimits", tmp_dir=tmp_base, python="/no/such/python", **LIMITS))


def test_bwrap_asked_for_where_it_is_missing_is_refused(tmp_base, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None if name == "bwrap"
                        else _which(name, path=path))
    with pytest.raises(ConfigError, match="tool.sandbox' is bwrap, but bubblewrap"):
        Sandbox(ToolConfig(sandbox="bwrap", tmp_dir=tmp_base, **LIMITS))


_which = shutil.which



@pytest.mark.parametrize("mode", ["rlimits", "bwrap"])
def test_a_small_output_bound_does_not_cut_the_start_up_probe(mode, tmp_base):
    # The probe reports the interpreter's directories as one JSON line, longer than this.
    box = make_sandbox(mode, tmp_base, max_output_chars=8)
    try:
        assert box.run("print(123456789)").observation.startswith("1234")
    finally:
        box.close()


def test_a_dead_process_leftovers_are_swept_and_a_live_ones_kept(tmp_base):
    """What a killed process's sandbox left goes when the next sandbox starts; what a live
    process's holds stays."""
    from rollout.tools.sandbox import WORKDIR_PREFIX, sweep_dead_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths = {name: os.path.join(tmp_base, name) for name in (
        f"{WORKDIR_PREFIX}{dead.pid}-abc", f"{WORKDIR_PREFIX}{os.getpid()}-def", "unrelated")}
    for path in paths.values():
        os.mkdir(path)
    left_by_user = os.path.join(tmp_base, "written-by-a-program")
    with open(left_by_user, "w") as out:
        out.write("x")
    if AS_ROOT:  # a file a dead process's sandbox user wrote
        os.chown(left_by_user, UID_BASE + (dead.pid << 8) + 1, UID_BASE + (dead.pid << 8) + 1)
    sweep_dead_leftovers(tmp_base, AS_ROOT)
    assert sorted(os.listdir(tmp_base)) == sorted(
        [f"{WORKDIR_PREFIX}{os.getpid()}-def", "unrelated"] + ([] if AS_ROOT else ["written-by-a-program"]))
    for name in os.listdir(tmp_base):
        path = os.path.join(tmp_base, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
