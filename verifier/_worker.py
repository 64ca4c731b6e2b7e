"""The scoring worker process.

Messages are JSON over ``Connection.send_bytes``/``recv_bytes``, never pickle: the
parent must not unpickle anything a worker that handled hostile text sends back.

- parent -> worker: ``[[task_id, a, b], ...]`` to score, or ``null`` to exit.
- worker -> parent: ``{"ready": pid}`` once, or ``{"fatal": message}`` and exit;
  then ``[task_id, score, error_or_null]`` per task, in order, as each one finishes
  (the parent uses the arrival times as per-sample start times for its deadlines).

This module imports only the standard library at the top; the scoring code is
imported by the zygote before it forks (see ``_zygote.py``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import signal
import sys
from multiprocessing.connection import Connection

MAX_ERROR_CHARS = 300

# Side effects that scoring math never needs. Blocking them in math workers is a second
# line of defence behind "model text is never evaluated": even if a parser bug let text
# run as code, it could not spawn processes, write files or open connections.
_BLOCKED_EVENTS = frozenset(
    {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "pty.spawn", "subprocess.Popen",
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
        "os.truncate", "os.chmod", "os.chown", "os.putenv", "os.unsetenv",
        "shutil.rmtree", "shutil.copyfile", "shutil.move", "shutil.make_archive",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "ctypes.dlopen", "pickle.find_class", "webbrowser.open",
        "urllib.Request",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guard_hook(event: str, args: tuple) -> None:
    if event in _BLOCKED_EVENTS:
        # PermissionError (an OSError) is what callers such as importlib's bytecode
        # writer already expect and tolerate.
        raise PermissionError(f"verifier worker: {event} is not allowed")
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        ):
            raise PermissionError("verifier worker: opening files for writing is not allowed")


def install_guard() -> None:
    """Refuse process creation, file writes and network use in this process, for good."""
    sys.dont_write_bytecode = True
    sys.addaudithook(_guard_hook)


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the process that forked us (the zygote) exits.

    A worker stuck in a C-level computation (a huge integer power) can't notice that
    the driver died; the zygote exits with the driver, so this makes sure no worker
    outlives a crashed driver.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        return
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(0)


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    import resource

    limit = int(memory_mb) * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _send(conn: Connection, obj: object) -> None:
    conn.send_bytes(json.dumps(obj).encode())


def _as_reward(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"reward function returned {type(value).__name__}, not a real number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"reward function returned {result}")
    return result


def worker_main(
    fd: int,
    *,
    mode: str,
    reward_fn_spec: str | None,
    memory_mb: int | None,
    guard: bool,
    parent_pid: int,
) -> None:
    """Serve scoring requests on the socket ``fd`` until EOF or ``null``."""
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C
    _die_with_parent(parent_pid)
    try:
        if mode == "math":
            from verifier import _mathcheck

            fn = _mathcheck.score
            _mathcheck.warm_up()  # free: the zygote already did it
        elif mode == "plugin":
            from verifier.plugin import load_reward_fn

            fn = load_reward_fn(reward_fn_spec or "")
        else:
            raise ValueError(f"unknown worker mode {mode!r}")
        _limit_memory(memory_mb)
        if guard:
            install_guard()
    except BaseException as exc:  # report why, instead of a bare exit code
        _send(conn, {"fatal": f"{type(exc).__name__}: {exc}"[:2000]})
        return
    _send(conn, {"ready": os.getpid()})

    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # parent went away
        batch = json.loads(data)
        if batch is None:
            return
        for task_id, a, b in batch:
            error = None
            try:
                reward = _as_reward(fn(a, b))
            except Exception as exc:
                reward = 0.0
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            try:
                _send(conn, [task_id, reward, error])
            except (EOFError, OSError):
                return
