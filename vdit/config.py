"""Loading ml_collections configs by path or name, and command-line overrides.

A config is a Python file with ``get_config(arg=None) -> ConfigDict``. It is named
either by path (``configs/tiny.py``, ``configs/tiny.py:variant``) or by the bare
name of a config shipped with vdit (``tiny``, ``wan2_1_t2v_1_3b:pod``), so it works
after a non-editable install too. The ``config.json`` a training run records in its
workdir (``W/vae/config.json``) loads as well, as the whole config of that run.
Returned configs are locked: assigning a key that does not exist is an error that
names the closest valid key.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import importlib.util
import json
import pathlib
import traceback
from typing import Iterable

import ml_collections


def available_configs() -> list[str]:
    """Names of the configs shipped with vdit."""
    package = importlib.import_module("vdit.configs")
    return sorted(p.stem for p in pathlib.Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]``, ``name[:arg]`` or a recorded ``config.json``; returns the locked config."""
    if spec.endswith(".json"):
        return _load_recorded(pathlib.Path(spec))
    name, _, arg = spec.partition(":")
    path = pathlib.Path(name)
    if path.suffix == ".py":
        if not path.exists():
            raise ValueError(f"config file {name!r} does not exist; shipped configs: {', '.join(available_configs())}")
        module_spec = importlib.util.spec_from_file_location(f"vdit_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        with _user_code(f"config file {name!r}", path):
            module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"config file {name!r} defines no get_config(arg=None) function returning a ConfigDict")
    else:
        known = available_configs()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown config {name!r}{hint} (shipped: {', '.join(known)}; or pass a path to a .py file)")
        module = importlib.import_module(f"vdit.configs.{name}")
    with _user_code(f"config {spec!r}: get_config({arg or None!r})", path if path.suffix == ".py" else None):
        config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config {spec!r}: get_config returned a {type(config).__name__}, expected an "
                         f"ml_collections.ConfigDict (start from vdit.configs._base.base_config())")
    base = importlib.import_module("vdit.configs._base").base_config()
    if missing := [k for k in base if k not in config]:
        raise ValueError(f"config {spec!r} lacks the top-level keys {', '.join(missing)}: build it on "
                         f"vdit.configs._base.base_config(), which holds every key")
    config.lock()
    return config


@contextlib.contextmanager
def _user_code(what: str, path: pathlib.Path | None):
    """Runs a user's config file: an error in it becomes one line naming the file and line.

    A ValueError passes as it is: configs raise it to say what is wrong with their argument.
    Shipped configs (``path`` None) keep their traceback, as any other vdit bug.
    """
    try:
        yield
    except ValueError:
        raise
    except Exception as e:
        if path is None:
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if pathlib.Path(f.filename) == path.resolve()
                  or pathlib.Path(f.filename) == path]
        where = f" at line {frames[-1].lineno}" if frames else ""
        raise ValueError(f"{what} failed{where}: {type(e).__name__}: {e}") from e


def _load_recorded(path: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a training run wrote to ``W/<phase>/config.json`` (JSON lists back to tuples)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist; a workdir records its config as "
                         f"W/vae/config.json and W/dit/config.json") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"config file {str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("vae", "text", "dit")):
        raise ValueError(f"config file {str(path)!r} is not a config a vdit run recorded (expected a JSON object "
                         f"with 'vae', 'text' and 'dit' sections)")

    def retuple(value):
        if isinstance(value, dict):
            return {k: retuple(v) for k, v in value.items()}
        return tuple(retuple(v) for v in value) if isinstance(value, list) else value

    config = ml_collections.ConfigDict(retuple(data))
    config.lock()
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, prefix + key + "."))
    return keys


def _parse_value(text: str, current):
    """Parses an override string into the type of the current value (``None`` for None)."""
    if text == "None":
        return None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool) and isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def override(config: ml_collections.ConfigDict, assignments: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``a.b.c=value`` assignments in place; unknown keys fail with a suggestion.

    Values are parsed as Python literals and must keep the type of the current value
    (ints widen to floats); strings are taken as they are. ``None`` unsets the keys
    that are None in the base config (optional settings such as ``vae.latents_mean``).
    """
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep:
            raise ValueError(f"override {assignment!r} must look like key.sub=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if node is None:
                break
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            close = difflib.get_close_matches(key, _all_keys(config), n=1, cutoff=0.5)
            sections = [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)]
            hint = f"; did you mean {close[0]!r}?" if close else f" (sections: {', '.join(sections)})"
            raise ValueError(f"unknown config key {key!r}{hint}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            example = f"{key}.{next(iter(current))}"
            raise ValueError(f"config key {key!r} is a section; set one of its fields, e.g. {example}")
        value = _parse_value(text, current)
        if key in _INT_OR_PAIR and isinstance(value, (int, tuple, list)) and not isinstance(value, bool):
            # A square size or an (H, W) pair: ml_collections fixes a field's type, so swap the field.
            value = tuple(value) if isinstance(value, list) else value
            with node.unlocked():
                del node[leaf]
                node[leaf] = value
            continue
        if value is None and current is not None and not _may_be_none(key):
            raise ValueError(f"config key {key!r} cannot be None: it is {type(current).__name__} ({current!r}) "
                             f"and has no unset default")
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(
                f"config key {key!r} is {type(current).__name__} ({current!r}); cannot set it to {value!r}"
            ) from e
    return config


# Keys that take an int (a square) or an (H, W) pair.
_INT_OR_PAIR = {"data.resolution"}


def _may_be_none(key: str) -> bool:
    """Whether ``key`` is None in the base config: an optional setting that ``None`` unsets."""
    from vdit.configs._base import base_config

    node = base_config()
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return node is None


def to_kwargs(section: ml_collections.ConfigDict) -> dict:
    """A config section as plain constructor kwargs (lists become tuples)."""
    out = {}
    for key, value in section.to_dict().items():
        out[key] = tuple(value) if isinstance(value, list) else value
    return out
