"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, fanned out to the other
loggers ``trainer.loggers`` names (TensorBoard, Weights & Biases).

``metrics.jsonl`` is always written: ``lpreg plot``, resume and the tests read it. The other
loggers get the finite scalars of each record; lists and strings stay in the JSON only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from conf.schema import LpregConfig

log = logging.getLogger("lpreg")

DEFAULT_LOGGERS = ("jsonl", "tensorboard")
# A resumed run logs into the same W&B run: its id is kept here, in the run directory.
WANDB_RUN_ID_FILE = "wandb_run_id"


class MetricsLogger(Protocol):
    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


class JsonlLogger:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional outside the pinned install
            log.warning("tensorboard is not installed; trainer.loggers' tensorboard writes nothing")

    def log(self, step: int, record: dict[str, Any]) -> None:
        if self._tb is not None:
            for key, value in _scalars(record).items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class WandbLogger:
    """One W&B run per run directory, its files under ``<run dir>/wandb``.

    ``WANDB_MODE=offline`` keeps it off the network (``wandb sync`` uploads later). With
    ``resume`` the id saved in ``<run dir>/wandb_run_id`` is reused, so a resumed training
    run continues the same W&B run. Steps are logged as the ``step`` metric, not as W&B's
    own step counter: a resumed run redoes the steps since its last checkpoint, and W&B
    drops any record whose own step goes backwards.
    """

    def __init__(self, run_dir: Path, project: str, name: str, config: dict | None = None,
                 resume: bool = False):
        try:
            import wandb
        except ImportError as err:
            raise RuntimeError("trainer.loggers includes wandb, but the wandb package is not "
                               "installed") from err
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else ""
        self.run = wandb.init(project=project, name=name, dir=str(run_dir),
                              id=run_id or None, resume="allow",
                              config=config)
        id_file.write_text(self.run.id, encoding="utf-8")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.run.log({"step": step, **_scalars(record)})

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Writes each step's record to every configured logger.

    ``cfg`` decides the loggers (``trainer.loggers``) and names the W&B run
    (``trainer.project``, ``trainer.experiment`` or else ``trainer.run_name``; it continues
    when ``trainer.resume`` is not ``never``). Without it, the run directory's
    ``config.yaml`` (the resolved config the trainer writes there first) decides, and
    without that, JSONL and TensorBoard.
    """

    def __init__(self, run_dir: str | Path, cfg: LpregConfig | None = None):
        run_dir = Path(run_dir)
        cfg = cfg if cfg is not None else _run_config(run_dir)
        names = dict.fromkeys(["jsonl", *(cfg.trainer.loggers if cfg is not None else DEFAULT_LOGGERS)])
        self.path = run_dir / "metrics.jsonl"
        self.loggers: list[MetricsLogger] = []
        try:
            for name in names:
                self.loggers.append(LOGGERS[name](run_dir, cfg))
        except BaseException:
            self.close()
            raise

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        for logger in self.loggers:
            logger.log(step, record)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # noqa: BLE001 - close the others, then report
                errors.append(err)
        if errors:
            raise errors[0]


def _wandb_logger(run_dir: Path, cfg: LpregConfig | None) -> WandbLogger:
    from omegaconf import OmegaConf

    from conf.schema import LpregConfig

    cfg = cfg if cfg is not None else LpregConfig()
    trainer = cfg.trainer
    return WandbLogger(run_dir, project=trainer.project, name=trainer.experiment or trainer.run_name,
                       config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                       resume=trainer.resume != "never")


# trainer.loggers' names (conf.schema.METRICS_LOGGERS) and how each starts.
LOGGERS = {
    "jsonl": lambda run_dir, cfg: JsonlLogger(run_dir),
    "tensorboard": lambda run_dir, cfg: TensorBoardLogger(run_dir),
    "wandb": lambda run_dir, cfg: _wandb_logger(run_dir, cfg),
}


def _run_config(run_dir: Path) -> LpregConfig | None:
    """The config a run directory was written with, or None when it has none (or an old
    one this schema cannot read: then the default loggers do)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from conf.schema import LpregConfig

    try:
        merged = OmegaConf.merge(OmegaConf.structured(LpregConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (OmegaConfBaseException, OSError, ValueError) as err:
        log.warning("%s: not readable with this config schema (%s); logging to %s",
                    path, str(err).splitlines()[0], ", ".join(DEFAULT_LOGGERS))
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; none when it does not exist. A last line cut short
    (a run killed mid-write, or a line being written now) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
