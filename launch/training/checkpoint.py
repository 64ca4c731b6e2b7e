"""Checkpoints: atomic, self-describing directories that a run resumes from exactly.

``<run_dir>/checkpoints/step_<N>/`` holds:

| path | content |
|---|---|
| ``deepspeed/state/`` | every learner rank's DeepSpeed model, optimizer (and scheduler) state |
| ``hf/`` | a Hugging Face export (safetensors, config, tokenizer) that vLLM loads as it is |
| ``learner_rng/rank_<r>.pt`` | each learner rank's torch RNG state |
| ``trainer_state.json`` | the step, the weight version, the sampler position, the layout |
| ``driver_rng.json`` | the driver's Python, NumPy and torch RNG states |
| ``COMPLETE`` | the manifest: every file above with its size |

A checkpoint is written into ``step_<N>.tmp``; the manifest goes last and is fsynced,
then the directory is renamed. A directory is only ever picked when its manifest is
there and every file it lists has the recorded size, so neither a crash mid-write nor a
truncated copy can be resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from conf.errors import ConfigError

log = logging.getLogger("lpreg")

CHECKPOINT_DIR = "checkpoints"
MARKER = "COMPLETE"
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
DRIVER_RNG_FILE = "driver_rng.json"
HF_DIR = "hf"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What the driver needs, besides the learners' own state, to continue a run."""

    step: int
    weight_version: int
    # The sampler's position after every draw so far; ``pending_rounds`` lists the rounds
    # drawn but not yet trained on (step, round index, the sampler state they drew from),
    # in draw order. Checkpoints written before that field existed hold the position
    # before the oldest pending round, and no list.
    sampler: dict[str, int]
    num_prompts: int
    learner_world_size: int
    zero_stage: int
    seed: int
    model_path: str = ""
    pending_rounds: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


class LearnerCheckpointing(Protocol):
    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> None: ...


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def due(step: int, save_every: int, total_steps: int) -> bool:
    """Every ``save_every`` steps, and after the last one so a finished run can be evaluated."""
    return save_every > 0 and (step % save_every == 0 or step == total_steps)


# -- discovery ----------------------------------------------------------------------

def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (the write did not finish)"
    try:
        manifest = json.loads(marker.read_text())
        files: dict[str, int] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MARKER} marker"
    if STATE_FILE not in files:
        return f"the manifest lists no {STATE_FILE}"
    for relative, size in files.items():
        file = path / relative
        if not file.is_file():
            return f"{relative} is missing"
        if file.stat().st_size != size:
            return f"{relative} has {file.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(root: str | Path, warn: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first; the others are named in a warning."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.endswith(TMP_SUFFIX):
            if warn:
                log.warning("ignoring checkpoint %s: an interrupted write", path)
            continue
        step = parse_step(path.name)
        if step is None:
            continue
        reason = incomplete_reason(path)
        if reason is not None:
            if warn:
                log.warning("ignoring checkpoint %s: %s", path, reason)
            continue
        found.append((step, path))
    return sorted(found)


def find_latest(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint ``trainer.resume`` asks for, or None to start from ``model.path``."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(checkpoint_root(run_dir))
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'trainer.resume': {path} is not a directory "
                          "(expected 'auto', 'never' or a checkpoint path)")
    if parse_step(path.name) is None and not (path / MARKER).exists():
        latest = find_latest(path)
        if latest is None:
            raise ConfigError(f"config key 'trainer.resume': no complete checkpoint in {path}")
        return latest
    reason = incomplete_reason(path)
    if reason is not None:
        raise ConfigError(f"config key 'trainer.resume': {path} is not a complete checkpoint: {reason}")
    return path


def plan(cfg) -> tuple[Path | None, Path]:
    """(checkpoint to resume from or None, where this run's checkpoints go), checked.

    A fresh run that would save into a directory holding an earlier run's checkpoints
    is refused: pruning would mix or delete them, and ``resume=auto`` would later pick
    whichever has the highest step.
    """
    trainer = cfg.trainer
    run_dir = Path(trainer.output_dir) / trainer.run_name
    root = checkpoint_root(run_dir)
    resume_from = resolve_resume(trainer.resume, run_dir)
    if resume_from is None and trainer.save_every > 0 and list_checkpoints(root, warn=False):
        raise ConfigError(
            f"config key 'trainer.resume': {root} holds checkpoints of an earlier run; pass "
            "trainer.resume=auto to continue it, or choose another trainer.run_name")
    if resume_from is not None and trainer.resume != "auto":
        step = read_state(resume_from).step
        newer = [str(path) for s, path in list_checkpoints(root, warn=False) if s > step]
        if newer:
            log.warning("resuming from step %d while this run holds later checkpoints (%s): the "
                        "new ones replace them step by step, and until then trainer.resume=auto "
                        "would pick the later ones", step, ", ".join(newer))
    return resume_from, root


def read_state(path: str | Path) -> TrainerState:
    return TrainerState.from_json((Path(path) / STATE_FILE).read_text())


def check_compatible(state: TrainerState, *, world_size: int, zero_stage: int,
                     num_prompts: int, where: Path) -> None:
    """DeepSpeed's ZeRO shards are per rank: resuming them needs the same layout."""
    if state.zero_stage != zero_stage:
        raise ConfigError(f"config key 'learner.zero_stage' is {zero_stage}, but the checkpoint "
                          f"{where} was written with {state.zero_stage}")
    if zero_stage > 0 and state.learner_world_size != world_size:
        raise ConfigError(f"config key 'learner.num_workers' is {world_size}, but the ZeRO-"
                          f"{zero_stage} checkpoint {where} holds {state.learner_world_size} shards")
    if state.num_prompts != num_prompts:
        log.warning("the checkpoint %s was written with %d training prompts, this run has %d: "
                    "the sampler position continues, but the prompt order differs",
                    where, state.num_prompts, num_prompts)


# -- RNG ------------------------------------------------------------------------------

def driver_rng_state() -> dict:
    """The driver's RNG states as JSON-able data."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_driver_rng(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# -- writing ------------------------------------------------------------------------------

def begin(root: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = Path(root) / (step_dir_name(step) + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(tmp: Path) -> Path:
    """Seal ``step_<N>.tmp``: flush every file, write the manifest, rename.

    The manifest is written only after every file is on disk, and the rename only
    after the manifest is, so whatever a crash leaves behind is either a ``.tmp``
    directory or a checkpoint whose manifest vouches for all of its files.
    """
    files: dict[str, int] = {}
    for dirpath, _, names in os.walk(tmp):
        for name in names:
            file = Path(dirpath) / name
            _fsync(file)
            files[str(file.relative_to(tmp))] = file.stat().st_size
        _fsync(Path(dirpath))
    marker = tmp / MARKER
    with marker.open("w", encoding="utf-8") as handle:
        json.dump({"format_version": FORMAT_VERSION, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(tmp)
    final = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX))
    if final.exists():
        # The same step written again, after resuming from an older checkpoint: the
        # new one replaces it, and the old one only goes once the new one is in place.
        stale = final.with_name(final.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(final.parent)
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all).

    Leftover ``.tmp`` directories from interrupted writes go too; incomplete
    directories of any other name are left for the user to look at.
    """
    root = Path(root)
    removed = []
    for path in root.glob("step_*" + TMP_SUFFIX):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if keep_last > 0:
        for _, path in list_checkpoints(root, warn=False)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save(root: str | Path, state: TrainerState, learners: LearnerCheckpointing,
         keep_last: int) -> Path:
    """Write the checkpoint of ``state.step``: learner state first, the driver's last."""
    tmp = begin(root, state.step)
    learners.save_checkpoint(str(tmp))
    (tmp / STATE_FILE).write_text(state.to_json())
    (tmp / DRIVER_RNG_FILE).write_text(json.dumps(driver_rng_state()))
    final = finalize(tmp)
    prune(root, keep_last)
    return final


def restore(path: str | Path, learners: LearnerCheckpointing, sampler) -> TrainerState:
    """Load every learner rank's state, the sampler position and the driver's RNG."""
    path = Path(path)
    state = read_state(path)
    learners.load_checkpoint(str(path))
    sampler.load_state(state.sampler)
    rng_file = path / DRIVER_RNG_FILE
    if rng_file.is_file():
        restore_driver_rng(json.loads(rng_file.read_text()))
    return state
