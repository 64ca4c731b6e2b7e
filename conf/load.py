"""Loading the config: schema defaults, a recipe, ``key=value`` overrides, then validation.

A recipe may name the recipes it builds on under ``extends:`` (one, or a list). Its bases
are merged first, in the order given, each with its own bases before it; then the recipe
itself. Plain omegaconf merges: a later file wins key by key, and a list replaces a list.

Every problem becomes a ``ConfigError`` whose one-line message names the key (or the
file); the command line turns it into exit status 2, before anything starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from conf.errors import ConfigError
from conf.schema import LpregConfig
from conf.validate import validate

CONF_DIR = Path(__file__).resolve().parent
RECIPE_DIR = CONF_DIR / "recipes"
EXTENDS_KEY = "extends"


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


def _resolve_base(name: object, path: Path) -> Path:
    """A base named in ``path``'s ``extends``: a file beside ``path`` (or a path from
    there, or an absolute one), else a shipped recipe, as ``-c`` takes it."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' takes a recipe name or path, or a list of "
                          f"them; got {name!r}")
    for candidate in (path.parent / name, path.parent / f"{name}.yaml",
                      RECIPE_DIR / name, RECIPE_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{path}: base recipe '{name}' not found, neither beside it nor among "
                      f"the shipped recipes in {RECIPE_DIR}")


def _read_recipe(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if node is None or OmegaConf.is_list(node):
        raise ConfigError(f"{path}: a recipe is a mapping of config keys")
    return node


def recipe_files(path: Path, _chain: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """Every file a recipe is made of, in merge order (its bases first), each with its
    settings less the ``extends`` key. A base reached twice (two bases sharing one) is
    merged once, where it first comes, so it cannot undo what came between."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(path):], path))
        raise ConfigError(f"{path}: recipes extend each other in a cycle: {cycle}")
    node = _read_recipe(path)
    bases = node.pop(EXTENDS_KEY, None)
    if bases is None:
        bases = []
    elif OmegaConf.is_list(bases):
        bases = list(bases)
    else:
        bases = [bases]
    files: list[tuple[Path, DictConfig]] = []
    for base in bases:
        for found, settings in recipe_files(_resolve_base(base, path), (*_chain, path)):
            if all(found != seen for seen, _ in files):
                files.append((found, settings))
    return [*files, (path, node)]


def load_config(recipe: str | None = None, overrides: Iterable[str] = ()) -> LpregConfig:
    """Schema defaults, then the recipe (its bases first), then ``key=value`` overrides,
    then checks."""
    schema = OmegaConf.structured(LpregConfig)
    cfg = schema
    if recipe:
        for path, settings in recipe_files(resolve_recipe(recipe)):
            try:
                cfg = OmegaConf.merge(cfg, settings)
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
