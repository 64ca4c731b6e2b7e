"""Run one untrusted Python program, as the model wrote it, and say what it printed.

Every program runs:
- as a user of its own (root is never the sandbox: it ignores RLIMIT_NPROC and may signal
  Ray). The user is ``UID_BASE + (pid << 8) + slot``: a number no account or file owns,
  unique to this process and slot, so two programs running at once cannot signal each
  other and share no process budget, and cleaning up after one never touches another;
- in a session of its own, under a launcher that kills and reaps everything it leaves
  behind, with limits on CPU seconds, address space, file size and process count, and no
  core files;
- until it ends or its wall-clock deadline passes; then every process of its user is
  killed, daemons that left its session too (without root: every process below the
  launcher);
- with none of the parent's environment, in a private temporary directory owned by its
  user and removed afterwards;
- under bubblewrap where the machine has it (``bwrap``): new user, pid, network, IPC and
  UTS namespaces, ``/usr`` and the interpreter read-only, a size-capped tmpfs as ``/tmp``.
  Without it the limits above hold, and as root a network and IPC namespace of its own;
  a WARNING says so once.

It is not a virtual machine: the program shares the kernel with the host, and a kernel
bug is a way out. Limits are per process: a program may run ``max_processes`` processes,
each with ``memory_mb`` of address space and ``cpu_time_s`` of CPU, until the wall clock
ends it.

The launcher (``LAUNCHER``) is a separate interpreter, never a ``preexec_fn``: the caller
has threads, and a forked copy of it may deadlock before it execs.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from conf.errors import ConfigError
from conf.schema import ToolConfig
from rollout.tools.output import BoundedOutput

logger = logging.getLogger(__name__)

UID_BASE = 1 << 30  # pids stay below 2**22 and slots below 2**8: every uid fits below 2**31
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
PROGRAM = "program.py"
PYTHON_FLAGS = ("-u", "-B", "-E", "-s", "-X", "utf8")  # unbuffered: output keeps its order
# Where any user may write: in rlimits mode, what the sandbox user left there is removed.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
# Each program's private directory: lpreg-tool-<pid of the sandbox's process>-<random>.
WORKDIR_PREFIX = "lpreg-tool-"
# Read-only inside bwrap besides /usr: what the dynamic loader and time functions read.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
BWRAP_PROCESSES = 2  # bwrap and its init in the new pid namespace count against NPROC too
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CHUNK = 1 << 16
PROBE_MAX_CHARS = 1 << 16
DRAIN_S = 2.0  # for the output still in the pipe once every writer is dead
KILL_WAIT_S = 5.0

# Started with -I -S in a session of its own, as root (or as the caller, who is then the
# sandbox user). It forks the program: the child applies the limits, drops to the sandbox
# user and execs argv[6:]. The launcher stays, as the program's reaper: orphans of the
# program come to it (PR_SET_CHILD_SUBREAPER), so none lingers as a zombie that still
# counts against the user's process limit, whatever the machine's init does. The moment
# the program ends, it reports its wait status and CPU seconds on fd argv[5]; then, or on
# SIGTERM, it kills what is left of the process tree below it (its children, and theirs
# once they are orphans and come to it), reaps it, and exits.
LAUNCHER = """\
import ctypes, os, resource, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid, flags, spec, report = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                 sys.argv[4], int(sys.argv[5]))
libc.prctl(36, 1)
libc.prctl(1, 9)
if flags:
    libc.unshare(flags)
# Signals are waited for, never handled: a handler could run between reaping the program
# and reporting on it, and lose the report.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
main = os.fork()
if main == 0:
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.close(report)
        for item in filter(None, spec.split(",")):
            name, soft, hard = item.split(":")
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(soft), int(hard)))
        if uid >= 0:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        libc.prctl(1, 9)
        os.execve(sys.argv[6], sys.argv[6:], os.environ)
    except BaseException as err:
        os.write(2, f"sandbox: cannot start {sys.argv[6]}: {err}\\n".encode())
        os._exit(127)


def reap(options):
    # A child's pid (0: none ready; -1: none left); the program's is reported at once.
    try:
        pid, status, usage = os.wait4(-1, options)
    except ChildProcessError:
        return -1
    if pid == main:
        os.write(report, f"{status} {usage.ru_utime + usage.ru_stime}\\n".encode())
    return pid


stopped = False
while not stopped:
    pid = reap(os.WNOHANG)
    if pid in (main, -1):
        break
    if pid == 0:
        woken = signal.sigtimedwait({signal.SIGTERM, signal.SIGCHLD}, 1.0)
        stopped = woken is not None and woken.si_signo == signal.SIGTERM
me = os.getpid()
while True:
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            children = f.read().split()
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(int(child), 9)
        except OSError:
            pass
    if reap(0) == -1:
        break
"""

# Run once per sandbox as its user: can it run this interpreter, write in its directory,
# and which directories must bwrap show it?
PROBE = """\
import json, os, sys
with open("probe.txt", "w") as f:
    f.write("ok")
exe = sys.executable
print(json.dumps({"dirs": [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                           os.path.dirname(exe), os.path.dirname(os.path.realpath(exe))],
                  "net": os.readlink("/proc/self/ns/net")}))
"""

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message, *args)


class ToolStatus(enum.Enum):
    OK = "ok"  # exit status 0
    ERROR = "error"  # another exit status (an uncaught exception: 1)
    TIMEOUT = "timeout"  # still running at the wall-clock deadline
    KILLED = "killed"  # ended by a signal: a limit, or the program itself
    FAILED = "failed"  # the tool could not run the code at all


@dataclass(frozen=True)
class ToolResult:
    """What one tool call gives back; ``observation`` is the text the model sees."""

    observation: str
    status: ToolStatus
    exit_code: int | None = None  # the program's exit status; None when a signal ended it
    truncated: bool = False
    wall_s: float = 0.0


def describe_signal(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Sandbox:
    """Runs programs under ``cfg``'s limits; ``run`` is thread-safe and lets at most
    ``cfg.max_concurrency`` programs run at once (the others wait for a slot).

    Construction checks, by running a small program, that the sandbox user can run the
    interpreter and write its directory, and whether bwrap works here; a setting this
    machine cannot honour is a ``ConfigError``."""

    def __init__(self, cfg: ToolConfig) -> None:
        self.cfg = cfg
        self.switch_user = os.geteuid() == 0
        self.tmp_base = os.path.abspath(cfg.tmp_dir or tempfile.gettempdir())
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(cfg.max_concurrency):
            self._slots.put(slot)
        self._running: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._bwrap = shutil.which("bwrap", path=SAFE_PATH + ":/usr/sbin:/sbin")
        self._python_dirs: list[str] = []
        self.network_isolated = False
        self._check_tmp_base()
        sweep_dead_leftovers(self.tmp_base, self.switch_user)
        if not self.switch_user:
            _warn_once("user", "tool sandbox: not running as root, so programs run as this user "
                       "(uid %d), without a user of their own or a process-count limit",
                       os.getuid())
        self.python, probe = self._choose_python()
        self.mode = self._choose_mode(probe)
        logger.info("tool sandbox: %s, %s, at most %d at once", self.mode, self.python,
                    cfg.max_concurrency)

    # -- the one public call ------------------------------------------------------------

    def run(self, code: str) -> ToolResult:
        """Run ``code`` as a Python program and describe the outcome for the model."""
        if self._closed:
            return ToolResult("[tool error: the sandbox is closed]", ToolStatus.FAILED)
        slot = self._slots.get()
        try:
            return self._execute(code, slot, self.mode, self.python)
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        """Kill every program still running; later calls fail at once."""
        self._closed = True
        with self._lock:  # held: no launcher is reaped (and its pid freed) meanwhile
            for slot, proc in self._running.items():
                self._stop(proc, slot)

    # -- one execution ------------------------------------------------------------------

    def uid(self, slot: int) -> int:
        """The sandbox user of ``slot`` in this process."""
        if not self.switch_user:
            return os.getuid()
        return UID_BASE + (os.getpid() << 8) + slot

    def _execute(self, code: str, slot: int, mode: str, python: str,
                 max_chars: int | None = None) -> ToolResult:
        start = time.monotonic()
        uid = self.uid(slot)
        try:
            workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=self.tmp_base)
        except OSError as err:
            return ToolResult(f"[tool error: no temporary directory: {err}]", ToolStatus.FAILED)
        try:
            program = os.path.join(workdir, PROGRAM)
            with open(program, "w", encoding="utf-8", errors="replace") as f:
                f.write(code)
            if self.switch_user:
                os.chown(program, uid, uid)
                os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            report_r, report_w = os.pipe()
            try:
                argv, env = self._command(mode, python, workdir, uid, report_w)
                proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True,
                                        pass_fds=(report_w,))
            except OSError as err:
                os.close(report_r)
                return ToolResult(f"[tool error: could not start: {err}]", ToolStatus.FAILED)
            finally:
                os.close(report_w)
            with self._lock:
                self._running[slot] = proc
            try:
                output, report, timed_out = self._collect(proc, report_r, start, slot,
                                                          max_chars or self.cfg.max_output_chars)
            except BaseException:
                _kill_group(proc)
                self._kill_user(slot)
                raise
            finally:
                with self._lock:
                    self._running.pop(slot, None)
                os.close(report_r)
                launcher_status = _reap(proc)
            # Normally a no-op (the launcher reaped everything); a backstop when it was killed.
            self._kill_user(slot, until_reaped=True)
        finally:
            if mode == "rlimits" and self.switch_user:
                self._remove_leftovers(uid)
            shutil.rmtree(workdir, ignore_errors=True)
        status, cpu_s = report if report else (launcher_status, 0.0)
        return self._result(output, os.waitstatus_to_exitcode(status), timed_out, cpu_s, mode,
                            time.monotonic() - start)

    def _command(self, mode: str, python: str, workdir: str, uid: int,
                 report_fd: int) -> tuple[list[str], dict]:
        cfg = self.cfg
        processes = cfg.max_processes + (BWRAP_PROCESSES if mode == "bwrap" else 0)
        limits = {"CPU": (cfg.cpu_time_s, cfg.cpu_time_s + 1), "AS": (cfg.memory_mb << 20,) * 2,
                  "FSIZE": (cfg.max_file_mb << 20,) * 2, "CORE": (0, 0)}
        # RLIMIT_NPROC counts every process of the user: only a user of its own can take it.
        if self.switch_user:
            limits["NPROC"] = (processes, processes)
        spec = ",".join(f"{name}:{soft}:{hard}" for name, (soft, hard) in limits.items())
        if mode == "bwrap":
            home = "/tmp"
            target = [self._bwrap, *self._bwrap_args(workdir), python, *PYTHON_FLAGS,
                      f"/tmp/{PROGRAM}"]
            flags = 0
        else:
            home = workdir
            target = [python, *PYTHON_FLAGS, os.path.join(workdir, PROGRAM)]
            flags = (CLONE_NEWNET | CLONE_NEWIPC) if self.switch_user else 0
        ids = (uid, uid) if self.switch_user else (-1, -1)
        argv = [python, "-I", "-S", "-c", LAUNCHER, str(ids[0]), str(ids[1]), str(flags), spec,
                str(report_fd), *target]
        env = {"PATH": SAFE_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               # One thread each: numerical libraries otherwise start a thread per core,
               # each with its own stack and heap, against the process and memory limits.
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return argv, env

    def _bwrap_args(self, workdir: str) -> list[str]:
        args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--ro-bind", "/usr", "/usr"]
        for path in ROOT_LINKS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in ETC_FILES:
            args += ["--ro-bind-try", path, path]
        for path in self._python_dirs:
            args += ["--ro-bind", path, path]
        return args + ["--proc", "/proc", "--dev", "/dev",
                       "--size", str(self.cfg.max_file_mb << 20), "--tmpfs", "/tmp",
                       "--ro-bind", os.path.join(workdir, PROGRAM), f"/tmp/{PROGRAM}",
                       "--chdir", "/tmp"]

    def _collect(self, proc: subprocess.Popen, report_fd: int, start: float, slot: int,
                 max_chars: int) -> tuple[BoundedOutput, tuple[int, float] | None, bool]:
        """Read the output until the program ends or its deadline passes; then kill whatever
        is left of it, and read what it wrote before it died. Also the launcher's report:
        the program's wait status and CPU seconds (None if none came)."""
        output = BoundedOutput(max_chars)
        assert proc.stdout is not None
        out_fd = proc.stdout.fileno()
        pidfd = os.pidfd_open(proc.pid)  # readable once the launcher has exited
        selector = selectors.DefaultSelector()
        selector.register(out_fd, selectors.EVENT_READ, "out")
        selector.register(report_fd, selectors.EVENT_READ, "report")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        state = {"report": b"", "gone": False}

        def pump(timeout: float) -> None:
            for key, _ in selector.select(timeout):
                if key.data == "out":
                    if not _read_into(out_fd, output):
                        selector.unregister(out_fd)
                elif key.data == "report":
                    state["report"] = os.read(report_fd, 256)
                    selector.unregister(report_fd)
                else:
                    state["gone"] = True
                    selector.unregister(pidfd)

        deadline = start + self.cfg.timeout_s
        timed_out = False
        try:
            # Until the program ends (the report), or the launcher does, or time is up.
            while not state["report"] and not state["gone"]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                pump(remaining)
            # Nothing of the program may outlive it: the launcher kills and reaps what is
            # left, then exits.
            self._stop(proc, slot)
            for _ in range(2):
                until = time.monotonic() + DRAIN_S
                while not state["gone"] and (left := until - time.monotonic()) > 0:
                    pump(left)
                if state["gone"]:
                    break
                _kill_group(proc)  # a launcher that does not finish: kill it too
                self._kill_user(slot)
            # Every writer of the sandbox is dead, so what it wrote is in the pipe: read
            # that without waiting for an end of file that a stray copy of the pipe held
            # by another process of the host would put off.
            if out_fd in selector.get_map():
                os.set_blocking(out_fd, False)
                try:
                    while _read_into(out_fd, output):
                        pass
                except BlockingIOError:
                    pass
        finally:
            selector.close()
            os.close(pidfd)
            proc.stdout.close()
        report = None
        if state["report"].strip():
            status, cpu = state["report"].split()
            report = (int(status), float(cpu))
        return output, report, timed_out

    def _stop(self, proc: subprocess.Popen, slot: int) -> None:
        """Kill the program and everything it started. The launcher kills its own tree
        when asked (SIGTERM; it is not reaped yet, so its pid is still its own). As root,
        every process of the sandbox user is killed too: a process that left the tree
        (none can, short of a way out of the sandbox) is still of that user."""
        try:
            os.kill(proc.pid, signal.SIGTERM)  # not Popen.send_signal: its poll() may reap
        except OSError:
            pass
        if self.switch_user:
            self._kill_user(slot)

    def _kill_user(self, slot: int, until_reaped: bool = False) -> None:
        """SIGKILL every process of ``slot``'s sandbox user, including any that left the
        process group (setsid, double fork), until none is alive; with ``until_reaped``,
        also until none is an unreaped zombie: those still count against RLIMIT_NPROC
        of the next program in the slot."""
        if not self.switch_user:
            return
        uid = self.uid(slot)
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            live, zombies = _signal_user(uid)
            if not live and not (until_reaped and zombies):
                return
            if time.monotonic() > deadline:
                logger.error("tool sandbox: processes of uid %d still %s after %g s", uid,
                             "alive" if live else "unreaped", KILL_WAIT_S)
                return
            time.sleep(0.002)

    def _remove_leftovers(self, uid: int) -> None:
        """In rlimits mode the program could write wherever any user may: remove what its
        user left in those places."""
        remove_entries(dict.fromkeys((*WORLD_WRITABLE, self.tmp_base)),
                       lambda entry, base: entry.stat(follow_symlinks=False).st_uid == uid)

    def _result(self, output: BoundedOutput, returncode: int, timed_out: bool, cpu_s: float,
                mode: str, wall_s: float) -> ToolResult:
        text = output.text()
        truncated = output.omitted > 0
        cfg = self.cfg
        exit_code: int | None = None
        if returncode < 0:
            sig = -returncode
        elif mode == "bwrap" and returncode > 128 and returncode - 128 < signal.NSIG:
            sig = returncode - 128  # bwrap passes a signal on as 128 + its number
        else:
            sig, exit_code = 0, returncode
        if timed_out:
            exit_code = None
            status, note = ToolStatus.TIMEOUT, f"[timed out after {cfg.timeout_s:g} s]"
        elif sig:
            status = ToolStatus.KILLED
            # Only the CPU limit sends SIGXCPU; SIGKILL comes at its hard limit, one second on.
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cfg.cpu_time_s):
                note = f"[killed: over the CPU time limit of {cfg.cpu_time_s} s]"
            elif sig == signal.SIGXFSZ:
                note = f"[killed: over the file size limit of {cfg.max_file_mb} MB]"
            else:
                note = f"[killed by {describe_signal(sig)}]"
        elif exit_code:
            status, note = ToolStatus.ERROR, f"[exit code {exit_code}]"
        else:
            status, note = ToolStatus.OK, "" if text else "[no output]"
        if note and text and not text.endswith("\n"):
            text += "\n"
        return ToolResult(text + note, status, exit_code, truncated, wall_s)

    # -- choices made once --------------------------------------------------------------

    def _check_tmp_base(self) -> None:
        if not os.path.isdir(self.tmp_base):
            raise ConfigError(f"config key 'tool.tmp_dir': {self.tmp_base} is not a directory")
        if not self.switch_user:
            return
        path = self.tmp_base
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                raise ConfigError(
                    f"config key 'tool.tmp_dir': the sandbox user cannot reach {self.tmp_base}, "
                    f"since {path} is closed to other users; set tool.tmp_dir to a directory "
                    "it can reach, e.g. /tmp")
            if path == os.path.dirname(path):
                return
            path = os.path.dirname(path)

    def _probe(self, code: str, mode: str, python: str) -> ToolResult:
        slot = self._slots.get()
        try:
            # The probe's report is read whole, whatever the model may see of a program.
            return self._execute(code, slot, mode, python, max_chars=PROBE_MAX_CHARS)
        finally:
            self._slots.put(slot)

    def _choose_python(self) -> tuple[str, dict]:
        """The first interpreter the sandbox user can run, and what it said about itself."""
        if self.cfg.python:
            candidates = [self.cfg.python]
        else:
            candidates = [sys.executable]
            system = shutil.which("python3", path=SAFE_PATH)
            if system and os.path.realpath(system) != os.path.realpath(sys.executable):
                candidates.append(system)
        failures = []
        for name in candidates:
            python = name if os.path.isabs(name) else shutil.which(name, path=SAFE_PATH)
            if not python:
                failures.append(f"{name}: not found in {SAFE_PATH}")
                continue
            result = self._probe(PROBE, "rlimits", python)
            if result.status is ToolStatus.OK:
                if name != candidates[0]:
                    _warn_once("python", "tool sandbox: the sandbox user cannot run %s; programs "
                               "run with %s and its packages instead (tool.python chooses)",
                               candidates[0], python)
                return python, json.loads(result.observation.strip().splitlines()[-1])
            failures.append(f"{python}: {_last_line(result.observation)}")
        raise ConfigError("config key 'tool.python': no interpreter the sandbox user can run ("
                          + "; ".join(failures) + ")")

    def _choose_mode(self, probe: dict) -> str:
        wanted = self.cfg.sandbox
        if wanted == "rlimits":
            reason = "tool.sandbox=rlimits"
        elif not self._bwrap:
            reason = "bubblewrap (bwrap) is not installed"
        else:
            self._python_dirs = dirs_to_bind(probe["dirs"])
            result = self._probe("print('ok')", "bwrap", self.python)
            if result.status is ToolStatus.OK and result.observation.strip() == "ok":
                self.network_isolated = True
                return "bwrap"
            reason = f"bwrap does not run here: {_last_line(result.observation)}"
        if wanted == "bwrap":
            raise ConfigError(f"config key 'tool.sandbox' is bwrap, but {reason}; install "
                              "bubblewrap (apt-get install bubblewrap) or set tool.sandbox=auto")
        self.network_isolated = probe["net"] != os.readlink("/proc/self/ns/net")
        _warn_once("rlimits", "tool sandbox: only rlimits are in force (%s): programs see every "
                   "file their user may read, and %s", reason,
                   "have no network" if self.network_isolated else "HAVE THE HOST'S NETWORK")
        return "rlimits"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_dead_leftovers(tmp_base: str, as_root: bool) -> None:
    """Remove what sandboxes of processes that no longer exist left behind.

    A process killed while a program runs (a rollout worker SIGKILLed, or shut down with a
    call in flight) never reaches its own cleanup, and its private directories would pile
    up in ``tmp_base`` over a long run with restarts. Each is named after its process
    (``lpreg-tool-<pid>-...``), and as root each sandbox user's uid holds its process's pid
    too, so what belongs to a dead process is known: its directories, and in rlimits mode
    whatever its users left in the world-writable places. A live process's, this one's or
    another sandbox's, is left alone."""
    places = dict.fromkeys((tmp_base, *WORLD_WRITABLE)) if as_root else (tmp_base,)

    def left_by_the_dead(entry: os.DirEntry, base: str) -> bool:
        pid = _leftover_pid(entry, base == tmp_base, as_root)
        return pid is not None and not _pid_alive(pid)

    remove_entries(places, left_by_the_dead)


def remove_entries(places, chosen: Callable[[os.DirEntry, str], bool]) -> None:
    """Remove every entry of the directories ``places`` that ``chosen(entry, place)``
    picks, files and whole trees alike; one that vanishes or resists meanwhile is skipped."""
    for base in places:
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            try:
                if not chosen(entry, base):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _leftover_pid(entry: os.DirEntry, in_tmp_base: bool, as_root: bool) -> int | None:
    """The process a sandbox leftover belongs to, or None if ``entry`` is not one."""
    if in_tmp_base and entry.name.startswith(WORKDIR_PREFIX):
        pid = entry.name[len(WORKDIR_PREFIX):].partition("-")[0]
        if pid.isdigit():
            return int(pid)
    if as_root:
        uid = entry.stat(follow_symlinks=False).st_uid
        if UID_BASE <= uid < 2 * UID_BASE:
            return (uid - UID_BASE) >> 8
    return None


def dirs_to_bind(dirs: list[str]) -> list[str]:
    """The interpreter's directories outside /usr (which bwrap shows anyway), each as
    given and as its real path, without any that lies inside another."""
    found: set[str] = set()
    for path in dirs:
        for candidate in (os.path.normpath(path), os.path.realpath(path)):
            if candidate != "/" and os.path.isdir(candidate) and not (
                    candidate == "/usr" or candidate.startswith("/usr/")):
                found.add(candidate)
    kept: list[str] = []
    for path in sorted(found):
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _last_line(text: str) -> str:
    """The end of an observation, for an error message: its last line and, when that is
    only the note on how it ended, the line before."""
    lines = text.strip().splitlines() or ["(no output)"]
    tail = lines[-2:] if lines[-1].startswith("[") else lines[-1:]
    return " ".join(tail)[-300:]


def _read_into(fd: int, output: BoundedOutput) -> bool:
    """One read from the pipe into ``output``; False at end of file."""
    chunk = os.read(fd, CHUNK)
    if chunk:
        output.feed(chunk)
    return bool(chunk)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen) -> int:
    """Wait for the launcher; its raw wait status."""
    try:
        _, status = os.waitpid(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere: nothing to learn from it
        return 0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status


def _owner(pid: str) -> tuple[int | None, bool]:
    """Real uid of a process, from /proc, and whether it is a zombie (dead, not reaped)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None, False
    uid, zombie = None, False
    for line in text.splitlines():
        if line.startswith("State:"):
            zombie = line.split()[1] in ("Z", "X")
        elif line.startswith("Uid:"):
            uid = int(line.split()[1])
            break
    return uid, zombie


def _status_uid(pid: str) -> int | None:
    """Real uid of a live (not zombie) process."""
    uid, zombie = _owner(pid)
    return None if zombie else uid


def _signal_user(uid: int) -> tuple[bool, bool]:
    """SIGKILL every live process whose real uid is ``uid``; whether there was any, and
    whether any of its dead are still unreaped. A pidfd taken before the second look
    makes sure that the process signalled is the one looked at."""
    live = zombies = False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        owner, zombie = _owner(pid)
        if owner != uid:
            continue
        if zombie:
            zombies = True
            continue
        try:
            pidfd = os.pidfd_open(int(pid))
        except OSError:
            continue
        try:
            if _status_uid(pid) == uid:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                live = True
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return live, zombies
