"""What the command lines share: a user's mistake becomes one `error:` line and a non-zero
exit (internal errors keep their tracebacks), and the experiment config is named and
overridden the same way everywhere (`--config FILE:ARG --config.rl.beta=0`)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import ml_collections

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = f"{CONFIG_DIR / 'tempo_r0.py'}:tiny"
USAGE_EXIT = 2


class UsageError(ValueError):
    """A user's mistake (a flag, an input file, a line in it): the message is one line that
    names the flag, file or line and what is wrong."""


def fail(message: str, code: int = USAGE_EXIT) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()
             ) -> NoReturn:
    """`sys.exit(main())`, with `UsageError` (and `user_errors`) printed as one line."""
    try:
        code = main()
    except (UsageError, *user_errors) as e:
        fail(str(e))
    sys.exit(code if isinstance(code, int) else 0)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py:arg` -> `get_config(arg)`. A path that does not exist from here is
    looked up among the configs shipped in the package, so `configs/tempo_r0.py:7b` works
    from any directory."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        shipped = CONFIG_DIR / p.name
        if not shipped.is_file():
            names = ", ".join(sorted(f.name for f in CONFIG_DIR.glob("*.py")
                                     if f.name != "__init__.py"))
            raise UsageError(f"--config {spec}: no such config file (shipped: {names})")
        p = shipped
    mod_spec = importlib.util.spec_from_file_location(f"_tempo_cfg_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise UsageError(f"--config {spec}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """`--config.rl.beta=0` style overrides, typed by the field they replace; an unknown
    field lists the valid ones, a value of the wrong type says what was expected."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not key.startswith("--config.") or not eq:
            raise UsageError(f"unrecognised argument {item!r} (a config override looks like "
                             "--config.rl.beta=0)")
        node, leaf = _field(config, key[len("--config."):], key)
        node[leaf] = _typed(key, node[leaf], value)


def set_fields(config: ml_collections.ConfigDict, values: Mapping[str, Any]
               ) -> ml_collections.ConfigDict:
    """Set dotted fields (`{"rl.beta": 0.0}`) to Python values, the way the command line's
    overrides find them (an unknown field is an error); returns `config`."""
    for dotted, value in values.items():
        node, leaf = _field(config, dotted, dotted)
        node[leaf] = value
    return config


def _field(config: ml_collections.ConfigDict, dotted: str, key: str
           ) -> tuple[ml_collections.ConfigDict, str]:
    """(the group holding field `dotted`, the field's name); `key` names it in errors."""
    *parents, leaf = dotted.split(".")
    node, where = config, "config"
    for name in [*parents, leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{key}: {where} has no field {name!r}{hint} (fields: "
                             f"{', '.join(valid)})")
        if name != leaf:
            node, where = node[name], f"{where}.{name}"
    return node, leaf


def _typed(key: str, old: Any, value: str) -> Any:
    if isinstance(old, ml_collections.ConfigDict):
        raise UsageError(f"{key} is a group of fields ({', '.join(sorted(old.keys()))}); "
                         "override one of them")
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"{key} expects true or false, got {value!r}")
        return value.lower() in ("true", "1")
    try:
        if isinstance(old, int):
            return int(value)
        if isinstance(old, float):
            return float(value)
    except ValueError:
        raise UsageError(f"{key} expects {type(old).__name__}, got {value!r}") from None
    return value


def setup_logging(level: int = 20) -> None:
    """Log at `level` (INFO) to stderr. `basicConfig` alone is not enough: a library's
    module-level `logging.warning` at import time already gave the root logger a handler at
    WARNING, which silenced every INFO line (e.g. "resuming from checkpoint N")."""
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-read INFO lines
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # "r1@0.5 is illegal" x 3
