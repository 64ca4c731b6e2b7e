"""A small fork server for scoring workers, started by ``pool.ScoringPool``.

Why not multiprocessing's spawn or forkserver: both re-import the driver's ``__main__``
in every new worker (slow when the driver imports Ray or torch at the top, and broken
for scripts without an ``if __name__ == "__main__"`` guard), and the forkserver is
process-global state shared with other libraries. Forking the driver itself is unsafe
(it has threads). This process is started fresh with ``subprocess``, imports and warms
up sympy and math-verify (or imports the reward plugin) once, and then forks a worker
per request, so a replacement for a killed worker is ready in milliseconds.

Protocol on the control socket (a Unix socket pair with the parent):
- zygote -> parent: ``{"ready": pid}`` or ``{"fatal": message}`` as one JSON line;
- parent -> zygote: one byte with the worker's end of a socket pair attached
  (SCM_RIGHTS); zygote -> parent: the new worker's pid as 8 bytes (negative errno
  if fork failed). EOF on the control socket makes the zygote exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import warnings

PID_FORMAT = "!q"


def _send_line(ctrl: socket.socket, obj: object) -> None:
    ctrl.sendall(json.dumps(obj).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ctrl_fd = int(argv[0])
    cfg = json.loads(argv[1])
    ctrl = socket.socket(fileno=ctrl_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C
    # Hostile text can make sympy warn on every sample; that must not flood driver logs.
    warnings.simplefilter("ignore")
    for entry in reversed(cfg["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)

    from verifier import _worker

    try:
        if cfg["mode"] == "math":
            from verifier import _mathcheck

            _mathcheck.warm_up()
        else:
            from verifier.plugin import load_reward_fn

            load_reward_fn(cfg["reward_fn"])
    except BaseException as exc:
        _send_line(ctrl, {"fatal": f"{type(exc).__name__}: {exc}"[:2000]})
        return
    # Auto-reap workers: the parent tracks them by pidfd, not by waitpid.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    _send_line(ctrl, {"ready": os.getpid()})

    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 1)
        except OSError:
            msg, fds = b"", []
        if not msg:
            # The parent closed the control socket or died. Nothing needs cleaning up,
            # and interpreter teardown with sympy loaded is slow on a busy machine.
            os._exit(0)
        if not fds:
            continue
        worker_fd = fds[0]
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(worker_fd)
            ctrl.sendall(struct.pack(PID_FORMAT, -(exc.errno or 1)))
            continue
        if pid == 0:
            code = 0
            try:
                ctrl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _worker.worker_main(
                    worker_fd,
                    mode=cfg["mode"],
                    reward_fn_spec=cfg["reward_fn"],
                    memory_mb=cfg["memory_mb"],
                    guard=cfg["guard"],
                    parent_pid=os.getppid(),
                )
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(worker_fd)
        ctrl.sendall(struct.pack(PID_FORMAT, pid))
