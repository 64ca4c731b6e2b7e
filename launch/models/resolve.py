"""Which model a run starts from: the user's directory, or the bootstrapped tiny model."""

from __future__ import annotations

import logging
from pathlib import Path

from conf.schema import LpregConfig

log = logging.getLogger("lpreg")


def resolve_model_path(cfg: LpregConfig) -> str:
    """The user's model directory, or the bootstrapped tiny model (built once, then reused)."""
    if cfg.model.path:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            from conf.load import ConfigError

            raise ConfigError(f"config key 'model.path': {path} is not a Hugging Face model "
                              "directory (no config.json)")
        return str(path.resolve())
    from launch.models.bootstrap import bootstrap, tiny_model_dir

    path = tiny_model_dir(cfg.model.cache_dir, cfg.model.tiny, cfg.data.synthetic, cfg.tool)
    if not path.exists():
        log.info("bootstrapping the tiny model into %s (once; later runs reuse it)", path)
    return str(bootstrap(path, cfg.model.tiny, cfg.data.synthetic, tool=cfg.tool).resolve())
