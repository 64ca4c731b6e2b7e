"""What reaches the terminal, and where each actor's own output goes (docs/output.md).

By default the driver's terminal shows lpreg's own lines and real errors only:

- Ray does not stream the actors' output to the driver (``log_to_driver=False``); each
  actor process sends its stdout and stderr (file descriptors 1 and 2, so vLLM's,
  DeepSpeed's, torch's and C libraries' output too) to ``<run dir>/logs/<actor>.log``,
  from the moment its process starts. The actor does this itself, in Ray's worker setup
  hook, so it works on every node: the file is at that path on the actor's node, which is
  the run directory itself when ``trainer.output_dir`` is on shared storage.
- Warnings known to be harmless are silenced where they come from: the logger that gives
  them (matched on the logger and its message template, not on printed text), a Python
  warnings filter, a library's own switch for progress bars.

An actor's error still reaches the driver, as the exception Ray raises there.

``verbose`` (``lpreg train -v``) silences nothing, and Ray streams every actor's output
live, as it comes; each actor then writes to its log file and to Ray's as well.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

LOG_DIR_ENV = "LPREG_ACTOR_LOG_DIR"
ACTOR_NAME_ENV = "LPREG_ACTOR_NAME"
VERBOSE_ENV = "LPREG_VERBOSE"
SETUP_HOOK = f"{__name__}.actor_process_setup"
_tees: list[subprocess.Popen] = []  # held for the life of the process

# (logger, start of the message template, its first argument or None): warnings that
# every CPU run gives, none of which says anything about this run.
KNOWN_HARMLESS = (
    # Every engine is seeded on purpose, and runs in its actor's process.
    ("vllm.engine.arg_utils", "The global random seed is set to", None),
    # rollout.enforce_eager=true on CPU, where torch.compile and Triton are not used.
    ("vllm.config.vllm", "Enforce eager set", None),
    ("vllm.config.vllm", "Inductor compilation was disabled", None),
    ("vllm.config.vllm", "Model Runner V2 requires Triton", None),
    ("vllm.platforms.cpu", "Triton is not installed", None),
    ("vllm.platforms.cpu", "Reset SSM cache type", None),
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend", None),
    # Speed hints for CPU serving (tcmalloc, Intel OpenMP preloaded; thread binding).
    ("vllm.v1.worker.cpu_worker", "%s is not found in LD_PRELOAD", None),
    ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use", None),
    # At every in-place weight reload: the rotary embedding has no weights to load, only
    # its cos/sin cache, which is put back as it was (docs/troubleshooting.md).
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights",
     "RotaryEmbedding"),
    # A learner without a GPU: the CPU accelerator is the one meant.
    ("DeepSpeed", "Setting accelerator to CPU", None),
)
# (category, message pattern) of Python warnings known to be harmless.
HARMLESS_PYTHON_WARNINGS = (
    # vLLM's Triton shim looks at every attribute of torch.distributed once.
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),
)


class _DropKnown(logging.Filter):
    def __init__(self, entries: list[tuple[str, str | None]]):
        super().__init__()
        self.entries = entries

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not any(template.startswith(start) and (arg is None or first == arg)
                       for start, arg in self.entries)


def silence_known_harmless() -> None:
    """Silence the known-harmless warnings in this process, at their loggers; idempotent."""
    by_logger: dict[str, list[tuple[str, str | None]]] = {}
    for name, start, arg in KNOWN_HARMLESS:
        by_logger.setdefault(name, []).append((start, arg))
    for name, entries in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(entries))
    for category, message in HARMLESS_PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_driver() -> None:
    """The driver's share: no Hugging Face progress bars (building the tiny model loads and
    writes it), and the same silenced warnings."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    silence_known_harmless()


def ray_runtime_env(logs_dir: Path | None, verbose: bool) -> dict:
    """The job's runtime environment: every actor process runs ``actor_process_setup``."""
    env_vars = {"TOKENIZERS_PARALLELISM": "false", VERBOSE_ENV: "1" if verbose else "0"}
    if not verbose:
        # Read when transformers and huggingface_hub are imported, so it must be in place
        # before the actor starts.
        env_vars["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if logs_dir is not None:
        env_vars[LOG_DIR_ENV] = str(Path(logs_dir).resolve())
    return {"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}


def actor_log_env(name: str) -> dict[str, str]:
    """``env_vars`` for an actor's own runtime environment: the name of its log file."""
    return {ACTOR_NAME_ENV: name}


def actor_log_path(logs_dir: Path, name: str) -> Path:
    return Path(logs_dir) / f"{name}.log"


def actor_process_setup() -> None:
    """Ray's worker setup hook: runs in every worker process of the job as it starts,
    before the actor's class is even loaded. It must not fail: a failing hook stops the
    worker, so a problem leaves the output with Ray, and says so there."""
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    try:
        if not verbose:
            silence_known_harmless()
        logs_dir, name = os.environ.get(LOG_DIR_ENV), os.environ.get(ACTOR_NAME_ENV)
        if logs_dir and name:
            redirect_output(actor_log_path(Path(logs_dir), name), echo=verbose)
    except Exception as err:  # noqa: BLE001 - anything, rather than a worker that cannot start
        print(f"lpreg: actor output stays in Ray's worker log: {err!r}", file=sys.stderr)


def redirect_output(path: Path, echo: bool = False) -> None:
    """Send this process's file descriptors 1 and 2 to the end of ``path``; with ``echo``,
    also to where they went before (through ``tee``, a process of its own, so that
    nothing written is lost when this process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with path.open("ab") as handle:
        handle.write(f"==== {path.stem}: pid {os.getpid()} on {socket.gethostname()}, "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
    if not echo:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return
    for target in (1, 2):
        # -i: a Ctrl-C meant for the driver must not end the copy; a session of its own
        # keeps terminal signals away too.
        tee = subprocess.Popen(["tee", "-a", "-i", str(path)], stdin=subprocess.PIPE,
                               stdout=target, stderr=subprocess.DEVNULL, start_new_session=True)
        os.dup2(tee.stdin.fileno(), target)
        tee.stdin.close()
        _tees.append(tee)
