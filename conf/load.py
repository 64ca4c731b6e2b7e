"""Loading the config: schema defaults, a recipe, ``key=value`` overrides, then validation.

Every problem becomes a ``ConfigError`` whose one-line message names the key; the
command line turns it into exit status 2, before anything starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from conf.errors import ConfigError
from conf.schema import LpregConfig
from conf.validate import validate

CONF_DIR = Path(__file__).resolve().parent
RECIPE_DIR = CONF_DIR / "recipes"


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


def to_yaml(cfg: LpregConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
