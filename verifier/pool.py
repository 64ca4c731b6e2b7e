"""A pool of scoring processes with a hard, per-sample timeout.

Why not ``multiprocessing.Pool`` or ``concurrent.futures``: neither can kill the one
worker stuck on one sample and carry on. Here the parent tracks, for every worker, the
sample it is running and when that sample started:

- A sample running longer than ``timeout_s`` gets its worker SIGKILLed and replaced;
  it scores 0 with status ``TIMEOUT``.
- A sample running longer than ``park_after_s``, and far longer than recent slow
  samples (``PARK_FACTOR`` times their 95th percentile), while other work waits, gets
  its worker *parked*: no more work is sent to it, and a fresh worker starts in its
  place (at most ``max_parked`` at a time). The parked sample keeps its own deadline.
  So a batch with several bombs costs about one timeout plus the normal work, not one
  timeout per bomb divided by the number of workers.
- A worker that dies (killed from outside, segfault) is replaced; the sample it was
  running is retried once, then scored 0 with status ``ERROR``.

Workers are forked by a zygote process (``_zygote.py``) that has sympy and math-verify
imported and warmed up, so a replacement worker is ready in milliseconds; the parent
(a Ray driver with threads) is never forked. Workers are tracked with pidfds, which
are immune to pid reuse and can be waited on.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from verifier._zygote import PID_FORMAT

logger = logging.getLogger(__name__)

# A worker's reply is a short JSON list; anything bigger is a broken worker.
MAX_MESSAGE_BYTES = 1 << 16
MAX_CHUNK = 16
# A sample is only suspect once it runs this many times longer than the 95th percentile
# of recent samples. Wall times stretch on a loaded machine and some reward plugins are
# always slow; parking those would only churn processes and lose the workers' caches.
PARK_FACTOR = 5.0
MAX_STARTUP_FAILURES = 3
ZYGOTE_ENTRY = "from verifier._zygote import main; main()"


class Status(enum.Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"  # the scoring function raised, or the worker died twice on it


@dataclass(frozen=True)
class Outcome:
    score: float
    status: Status
    error: str | None = None


class WorkerStartError(RuntimeError):
    """Workers cannot start (bad plugin, broken environment); retrying won't help."""


class _Batch:
    """Bookkeeping of one run(): which tasks wait, which are done."""

    def __init__(self, items: Sequence[tuple[str, str]], first_id: int) -> None:
        self.items = items
        self.first_id = first_id
        self.outcomes: list[Outcome | None] = [None] * len(items)
        self.queue: deque[int] = deque(range(first_id, first_id + len(items)))
        self.attempts: dict[int, int] = {}
        self.remaining = len(items)

    def _index(self, tid: int) -> int | None:
        i = tid - self.first_id
        return i if 0 <= i < len(self.items) else None

    def payload(self, tids: Sequence[int]) -> list[list]:
        return [[tid, *self.items[tid - self.first_id]] for tid in tids]

    def finish(self, tid: int, outcome: Outcome) -> None:
        i = self._index(tid)
        if i is not None and self.outcomes[i] is None:
            self.outcomes[i] = outcome
            self.remaining -= 1

    def requeue(self, tids: Sequence[int]) -> None:
        """Put unstarted tasks back at the front, in their order."""
        todo = [t for t in tids if (i := self._index(t)) is not None and self.outcomes[i] is None]
        self.queue.extendleft(reversed(todo))

    def results(self) -> list[Outcome]:
        assert all(o is not None for o in self.outcomes)
        return list(self.outcomes)  # type: ignore[arg-type]


class _Worker:
    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid = pid
        self.conn = conn
        try:
            # Readable once the process exits; kill through it can't hit a reused pid.
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.ready = False
        self.spawned_at = time.monotonic()
        self.inflight: deque[int] = deque()  # task ids sent and not yet answered, in order
        self.head_started = 0.0  # when inflight[0] started running (approximately)
        self.parked = False
        self.dead = False

    def waitables(self) -> list:
        return [self.conn] if self.pidfd is None else [self.conn, self.pidfd]

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass

    def release(self) -> None:
        for close in (self.conn.close, lambda: self.pidfd is not None and os.close(self.pidfd)):
            try:
                close()
            except OSError:
                pass


class _Zygote:
    """The fork server process and its control socket."""

    def __init__(self, cfg: dict) -> None:
        ours, theirs = socket.socketpair()
        self.ctrl = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE_ENTRY, str(theirs.fileno()), json.dumps(cfg)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._buf = b""
        self.ready = False
        self.broken = False  # a fork request failed: replace this zygote

    def wait_ready(self, timeout_s: float) -> None:
        self.ctrl.settimeout(timeout_s)
        while b"\n" not in self._buf:
            chunk = self.ctrl.recv(4096)
            if not chunk:
                raise WorkerStartError(
                    f"verifier fork server exited during start-up (exit code {self.proc.poll()})"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "fatal" in msg:
            raise WorkerStartError(f"verifier workers cannot start: {msg['fatal']}")
        self.ready = True

    def fork(self, timeout_s: float) -> tuple[int, Connection]:
        """A new worker process and the parent's end of its connection."""
        if not self.ready:
            self.wait_ready(timeout_s)
        ours, theirs = socket.socketpair()
        try:
            self.ctrl.settimeout(timeout_s)
            socket.send_fds(self.ctrl, [b"f"], [theirs.fileno()])
            raw = b""
            while len(raw) < struct.calcsize(PID_FORMAT):
                chunk = self.ctrl.recv(struct.calcsize(PID_FORMAT) - len(raw))
                if not chunk:
                    raise OSError("verifier fork server exited")
                raw += chunk
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        (pid,) = struct.unpack(PID_FORMAT, raw)
        if pid <= 0:
            ours.close()
            raise OSError(-pid, f"verifier fork server could not fork: {os.strerror(-pid)}")
        return pid, Connection(ours.detach())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        # It holds no state, and may still be warming up (not reading its socket).
        try:
            self.ctrl.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _kill_all(workers: list[_Worker], zygotes: list[_Zygote]) -> None:
    for w in workers:
        w.kill()
    for z in zygotes:
        try:
            z.proc.kill()
        except OSError:
            pass


class ScoringPool:
    """Runs ``fn(a, b) -> float`` over many pairs in worker processes, with deadlines.

    ``mode="math"`` uses math-verify equivalence; ``mode="plugin"`` calls the function
    named by ``reward_fn_spec``. ``memory_mb`` caps each worker's address space.
    ``guard`` (default: on for math) forbids workers to spawn processes, write files or
    use the network.
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        mode: str = "math",
        reward_fn_spec: str | None = None,
        memory_mb: int | None = 4096,
        park_after_s: float | None = None,
        max_parked: int | None = None,
        guard: bool | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if mode not in ("math", "plugin"):
            raise ValueError(f"unknown mode {mode!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.park_after_s = (
            float(park_after_s) if park_after_s is not None else max(0.05, min(0.5, self.timeout_s / 10))
        )
        self.max_parked = 4 * num_workers if max_parked is None else max_parked
        self._durations: deque[float] = deque(maxlen=256)
        self._park_threshold = self.park_after_s
        self.startup_timeout_s = startup_timeout_s
        self._zygote_cfg = {
            "mode": mode,
            "reward_fn": reward_fn_spec,
            "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
            "memory_mb": memory_mb,
            # User plugins may legitimately need files or subprocesses; math never does.
            "guard": (mode == "math") if guard is None else bool(guard),
        }
        self._workers: list[_Worker] = []
        self._zygotes: list[_Zygote] = []
        self._next_task_id = 0
        self._startup_failures = 0
        self._closed = False
        # Kill the processes if the pool is garbage-collected without close().
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, self._zygotes)
        # Start the zygote now so its warm-up overlaps with the caller's own set-up;
        # workers are forked on first use.
        self._zygotes.append(_Zygote(self._zygote_cfg))

    # ---- worker lifecycle -------------------------------------------------------

    def _zygote(self) -> _Zygote:
        z = self._zygotes[0]
        if z.broken or not z.alive():
            z.stop()
            self._zygotes[0] = z = _Zygote(self._zygote_cfg)
        return z

    def _spawn(self) -> None:
        zygote = self._zygote()
        try:
            pid, conn = zygote.fork(self.startup_timeout_s)
        except WorkerStartError:
            raise
        except OSError as exc:
            # Most likely the zygote was killed; the next call starts a new one.
            zygote.broken = True
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                raise WorkerStartError(f"cannot start verifier workers: {exc}") from exc
            return
        self._workers.append(_Worker(pid, conn))

    def _top_up(self) -> None:
        active = sum(1 for w in self._workers if not w.parked)
        for _ in range(self.num_workers - active):
            self._spawn()

    def _bury(self, w: _Worker) -> None:
        w.dead = True
        w.kill()
        w.release()
        self._workers.remove(w)

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        return [w.pid for w in self._workers]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Start the workers and block until they are ready. Optional: run() does it too."""
        if self._closed:
            raise RuntimeError("ScoringPool is closed")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch = _Batch([], self._next_task_id)
        self._top_up()
        while not all(w.ready for w in self._workers) or len(self._workers) < self.num_workers:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("verifier workers did not start in time")
            self._step(batch)

    def close(self) -> None:
        """Kill every worker process and the zygote; idempotent."""
        if self._closed:
            return
        self._closed = True
        # Workers hold no state worth a graceful exit, and a busy one would not see it.
        for w in list(self._workers):
            self._bury(w)
        for z in self._zygotes:
            z.stop()
        self._finalizer.detach()

    # ---- scoring ----------------------------------------------------------------

    def run(self, items: Sequence[tuple[str, str]]) -> list[Outcome]:
        """Score every ``(a, b)`` pair; returns one :class:`Outcome` per pair, in order."""
        if self._closed:
            raise RuntimeError("ScoringPool is closed")
        batch = _Batch(items, self._next_task_id)
        self._next_task_id += len(items)
        try:
            while batch.remaining:
                self._step(batch)
            self._top_up()  # replace workers lost at the end, so the next batch needn't wait
        except BaseException:
            # Workers holding tasks of an aborted batch would answer into the next one.
            for w in list(self._workers):
                if w.inflight or not w.ready:
                    self._bury(w)
            raise
        return batch.results()

    def _step(self, batch: _Batch) -> None:
        """Dispatch, wait for one event or deadline, and handle what happened."""
        self._top_up()
        now = time.monotonic()

        for w in self._workers:
            if not batch.queue:
                break
            if w.ready and not w.parked and not w.inflight:
                k = max(1, min(MAX_CHUNK, len(batch.queue) // (2 * self.num_workers)))
                chunk = [batch.queue.popleft() for _ in range(min(k, len(batch.queue)))]
                w.inflight.extend(chunk)
                w.head_started = now
                try:
                    w.conn.send_bytes(json.dumps(batch.payload(chunk)).encode())
                except (OSError, ValueError):
                    pass  # its death shows up on the sentinel below

        wake = now + 1.0
        n_parked = sum(1 for w in self._workers if w.parked)
        for w in self._workers:
            if w.inflight:
                wake = min(wake, w.head_started + self.timeout_s)
                if not w.parked and n_parked < self.max_parked:
                    wake = min(wake, w.head_started + self._park_threshold)
            elif not w.ready:
                wake = min(wake, w.spawned_at + self.startup_timeout_s)
        waitables = [x for w in self._workers for x in w.waitables()]
        ready = set(wait(waitables, timeout=max(0.0, wake - time.monotonic())))
        now = time.monotonic()

        # Read everything that arrived before judging deadlines or deaths, so a result
        # that beat its deadline is kept.
        for w in list(self._workers):
            exited = w.pidfd is not None and w.pidfd in ready
            if w.conn not in ready and not exited:
                continue
            try:
                while not w.dead and w.conn.poll():
                    self._handle_message(w, w.conn.recv_bytes(MAX_MESSAGE_BYTES), now, batch)
            except (EOFError, OSError, ValueError, TypeError):
                pass  # closed pipe or garbage: the worker is treated as dead
            else:
                if w.dead or not exited:
                    continue
            if not w.dead:
                self._on_death(w, batch)

        for w in list(self._workers):
            if w.inflight and now >= w.head_started + self.timeout_s:
                head = w.inflight.popleft()
                rest = list(w.inflight)
                w.inflight.clear()
                self._bury(w)
                batch.finish(head, Outcome(0.0, Status.TIMEOUT))
                batch.requeue(rest)
            elif (
                w.inflight
                and not w.parked
                and now >= w.head_started + self._park_threshold
                and n_parked < self.max_parked
                and (batch.queue or len(w.inflight) > 1)  # only worth it if work waits
            ):
                self._park(w)
                n_parked += 1
                head = w.inflight.popleft()
                batch.requeue(list(w.inflight))
                w.inflight = deque([head])
            elif not w.ready and now >= w.spawned_at + self.startup_timeout_s:
                self._on_death(w, batch)

    def _handle_message(self, w: _Worker, raw: bytes, now: float, batch: _Batch) -> None:
        msg = json.loads(raw)
        if isinstance(msg, dict):
            if "ready" in msg:
                w.ready = True
                self._startup_failures = 0
                return
            if "fatal" in msg:
                raise WorkerStartError(f"verifier worker failed to start: {msg['fatal']}")
            raise ValueError("unexpected message")
        tid, score, error = msg
        if tid in w.inflight:
            # Replies come in order; ids before tid were handed elsewhere on parking.
            while w.inflight[0] != tid:
                w.inflight.popleft()
            w.inflight.popleft()
        batch.finish(tid, Outcome(float(score), Status.OK if error is None else Status.ERROR, error))
        self._record_duration(now - w.head_started)
        w.head_started = now
        if w.parked:
            # Its later tasks went to other workers; it would redo them. Its replacement
            # already runs, so it retires.
            w.inflight.clear()
            self._bury(w)

    def _record_duration(self, seconds: float) -> None:
        self._durations.append(seconds)
        if len(self._durations) % 16 == 0 or len(self._durations) < 16:
            ordered = sorted(self._durations)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            self._park_threshold = max(self.park_after_s, PARK_FACTOR * p95)

    def _on_death(self, w: _Worker, batch: _Batch) -> None:
        # Workers die with their zygote (killed from outside); that is no fault of
        # the worker's start-up or of the sample it ran.
        blameless = not self._zygotes[0].alive()
        if not w.ready and not blameless:
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                self._bury(w)
                raise WorkerStartError("verifier workers keep dying at start-up")
        if w.inflight:
            head = w.inflight.popleft()
            attempts = batch.attempts.get(head, 0) + (0 if blameless else 1)
            batch.attempts[head] = attempts
            rest = list(w.inflight)
            w.inflight.clear()
            if attempts >= 2:
                batch.finish(head, Outcome(0.0, Status.ERROR, "worker died twice on this sample"))
                batch.requeue(rest)
            else:
                batch.requeue([head, *rest])
        self._bury(w)

    def _park(self, w: _Worker) -> None:
        # Not reniced: on a loaded machine a niced worker starves, and a legitimately
        # slow sample would then run into its timeout.
        w.parked = True
