"""Loading, overriding and validating the config, before any actor starts.

Every problem becomes a ``ConfigError`` whose one-line message names the key; the
command line turns it into exit status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from conf.schema import LpregConfig

CONF_DIR = Path(__file__).resolve().parent
RECIPE_DIR = CONF_DIR / "recipes"


class ConfigError(ValueError):
    """A config problem, phrased for the user, naming the offending key."""


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys() if hasattr(node, "keys") else []:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            keys.extend(_all_keys(child, full + "."))
    return keys


def _suggest(key: str, schema) -> str:
    close = difflib.get_close_matches(key, _all_keys(schema), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(err: OmegaConfBaseException, schema, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err).lower():
        return ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, schema)}")
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        return ConfigError(f"{source}: config key '{key}' got {value!r}: "
                           f"{str(err).splitlines()[0]}")
    return ConfigError(f"{source}: config key '{key}': {str(err).splitlines()[0]}")


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of one shipped in conf/recipes/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / (name_or_path if name_or_path.endswith(".yaml")
                            else name_or_path + ".yaml")
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{name_or_path}' not found; shipped recipes: {', '.join(known)}")


def load_config(recipe: str | None = None, overrides: Iterable[str] = ()) -> LpregConfig:
    """Schema defaults, then the recipe, then ``key=value`` overrides, then checks."""
    schema = OmegaConf.structured(LpregConfig)
    cfg = schema
    if recipe:
        path = resolve_recipe(recipe)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            # '+key=value' asks to add a key; the schema is closed, so it only works
            # where the schema has a free-form mapping.
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item.lstrip("+")]))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, "command line") from None
    try:
        OmegaConf.resolve(cfg)
        typed: LpregConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "config") from None
    validate(typed)
    return typed


CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def validate(cfg: LpregConfig) -> None:
    """Checks that need several keys at once."""
    def positive(key: str, value) -> None:
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")

    positive("rollout.num_workers", cfg.rollout.num_workers)
    positive("learner.num_workers", cfg.learner.num_workers)
    positive("data.prompts_per_step", cfg.data.prompts_per_step)
    positive("rollout.samples_per_prompt", cfg.rollout.samples_per_prompt)
    positive("learner.micro_batch_size", cfg.learner.micro_batch_size)
    positive("algorithm.mini_batches_per_step", cfg.algorithm.mini_batches_per_step)
    positive("algorithm.epochs_per_step", cfg.algorithm.epochs_per_step)
    positive("trainer.total_steps", cfg.trainer.total_steps)
    from launch.data.prompts import DataError
    from launch.data.synthetic import synthetic_problems

    try:  # the generator is the one judge of its settings; ask it now, not mid-run
        synthetic_problems(cfg.data.synthetic, 1, seed=cfg.data.synthetic.seed)
    except DataError as err:
        raise ConfigError(f"config key 'data.synthetic': {err}") from None
    if cfg.data.chat_template not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"config key 'data.chat_template' must be one of "
                          f"{', '.join(CHAT_TEMPLATE_MODES)}, got {cfg.data.chat_template!r}")
    tiny = cfg.model.tiny
    if tiny.warm_start_steps < 0 or tiny.warm_start_warmup_steps < 0:
        key = "warm_start_steps" if tiny.warm_start_steps < 0 else "warm_start_warmup_steps"
        raise ConfigError(f"config key 'model.tiny.{key}' must be 0 or more, got {getattr(tiny, key)}")
    if tiny.warm_start_steps > 0:
        positive("model.tiny.warm_start_lr", tiny.warm_start_lr)
        positive("model.tiny.warm_start_batch_size", tiny.warm_start_batch_size)
        positive("model.tiny.warm_start_probe_every", tiny.warm_start_probe_every)
        positive("model.tiny.warm_start_probe_problems", tiny.warm_start_probe_problems)
        if not 0.0 < tiny.warm_start_target_accuracy <= 1.0:
            raise ConfigError("config key 'model.tiny.warm_start_target_accuracy' must be in (0, 1], "
                              f"got {tiny.warm_start_target_accuracy}")
    if cfg.learner.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'learner.zero_stage' must be 0, 1, 2 or 3, "
                          f"got {cfg.learner.zero_stage}")
    sequences = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    split = cfg.algorithm.mini_batches_per_step * cfg.learner.num_workers
    if sequences % split:
        raise ConfigError(
            f"config key 'algorithm.mini_batches_per_step': {sequences} sequences per step "
            f"(data.prompts_per_step x rollout.samples_per_prompt) do not divide into "
            f"{cfg.algorithm.mini_batches_per_step} mini-batches x "
            f"{cfg.learner.num_workers} learners")
    if cfg.data.prompts_per_step % cfg.algorithm.mini_batches_per_step:
        raise ConfigError(
            f"config key 'algorithm.mini_batches_per_step': data.prompts_per_step="
            f"{cfg.data.prompts_per_step} is not a multiple of it, so a GRPO group "
            "would be split across mini-batches")
    from launch.cluster.placement import check_placement_config  # imports this module

    check_placement_config(cfg)
    if cfg.algorithm.advantage in ("grpo", "drgrpo", "rloo") and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            f"config key 'rollout.samples_per_prompt' is {cfg.rollout.samples_per_prompt}, "
            f"but the '{cfg.algorithm.advantage}' advantage compares samples of one prompt "
            "and needs at least 2")


def to_yaml(cfg: LpregConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
