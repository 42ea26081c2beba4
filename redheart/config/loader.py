"""Loading: TOML file, environment and command-line overrides merged, coerced to the fields' types.

Values are resolved with this precedence, highest first::

    command line (--set section.key=value, --output-dir)  >  environment (REDHEART_SECTION__KEY)
    >  the TOML file  >  the defaults of the sections

Every message names where the value came from (file:line, the environment variable or the --set
item). "Auto" values that depend on other keys are derived here, before validation sees them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redheart.config.errors import ConfigError, _did_you_mean
from redheart.config.sections import _CHOICES, SECTIONS
from redheart.config.security import REDACTED, SECRET_KEYS
from redheart.config.validation import _validate

if TYPE_CHECKING:
    from redheart.config.hybrid import HybridConfig


class _Origin:
    """Where values came from, to put file:line into messages."""

    def __init__(
        self, label: str, text: str | None = None, sources: dict[tuple[str, str], str] | None = None
    ):
        self.label = label
        self.text = text
        self.sources = sources or {}

    def where(self, section: str, key: str | None = None) -> str:
        if key is not None and (section, key) in self.sources:
            return self.sources[(section, key)]
        if self.text is not None:
            line = _find_line(self.text, section, key)
            if line:
                return f"{self.label}:{line}"
        return self.label


def _find_line(text: str, section: str, key: str | None) -> int | None:
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            current = line.strip("[] ").split("#")[0].strip()
            if key is None and current == section:
                return number
            continue
        if current == section and key is not None:
            name = line.split("=", 1)[0].strip().strip('"')
            if "=" in line and name == key:
                return number
    return None


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    output_dir: str | None = None,
) -> HybridConfig:
    """Read a TOML file, apply environment and command-line overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (fix: pass --config with an existing file, e.g. examples/hybrid.toml)"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    origin = _Origin(str(path), text)
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{origin.where(section)}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}; "
                f"sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{origin.where(section)}: `{section}` must be a [section] table")
        raw[section].update(values)

    env = os.environ if env is None else env
    for var, value in env.items():
        if not var.startswith("REDHEART_") or "__" not in var:
            continue
        section, _, key = var[len("REDHEART_") :].lower().partition("__")
        if section not in SECTIONS:
            raise ConfigError(
                f"environment {var}: unknown section `{section}`{_did_you_mean(section, SECTIONS)}"
            )
        raw[section][key] = (
            _parse_secret(value) if (section, key) in SECRET_KEYS else parse_override_value(value)
        )
        origin.sources[(section, key)] = f"environment {var}"

    for item in overrides or []:
        section, key, value = parse_override(item)
        raw[section][key] = value
        origin.sources[(section, key)] = (
            f"--set {section}.{key}={REDACTED}" if (section, key) in SECRET_KEYS else f"--set {item}"
        )
    if output_dir is not None:
        raw["orchestrator"]["output_dir"] = output_dir
        origin.sources[("orchestrator", "output_dir")] = "--output-dir"
    return _build(raw, origin)


def parse_override_value(text: str) -> Any:
    """A value from the command line or environment: TOML syntax, or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.max_steps=10")
    dotted, _, value = item.partition("=")
    shown = f"{dotted.strip()}={REDACTED}" if "token" in dotted.lower() else item
    section, key = _split_dotted(dotted.strip(), context=f"--set {shown!r}")
    if (section, key) in SECRET_KEYS:
        return section, key, _parse_secret(value.strip())
    return section, key, parse_override_value(value.strip())


def _parse_secret(text: str) -> str:
    """A secret from the command line or environment: verbatim (a token of digits stays a string),
    unless written as a quoted TOML string."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
        return value if isinstance(value, str) else text
    return text


def _split_dotted(dotted: str, context: str | None = None) -> tuple[str, str]:
    context = context or repr(dotted)
    if "." not in dotted:
        raise ConfigError(f"{context}: expected section.key, e.g. train.batch_size")
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"{context}: unknown section `{section}`{_did_you_mean(section, SECTIONS)}")
    return section, key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type):
        return {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "dict": "table"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp)


def _coerce(value: Any, tp: Any, where: str, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, dotted)
            except ConfigError:
                errors.append(_type_name(typing.get_origin(option) or option))
        raise ConfigError(f"{where}: {dotted} = {value!r} must be {' or '.join(errors)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted} = {value!r} must be a list, e.g. [1, 2, 2]")
        return [_coerce(v, item_tp, where, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {dotted} = {value!r} must be a table, e.g. {{ name = 1.0 }}")
        return {str(k): _coerce(v, val_tp, where, f"{dotted}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {dotted} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {dotted} = {value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {dotted} = {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {dotted} = {value!r} must be a string (in quotes)")
    raise TypeError(f"unsupported config type {tp}")


def _build(raw: Mapping[str, Mapping[str, Any]], origin: _Origin) -> HybridConfig:
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.get(name, {}).items():
            if key not in known:
                raise ConfigError(
                    f"{origin.where(name, key)}: unknown key `{key}` in [{name}]{_did_you_mean(key, known)}; "
                    f"valid keys: {', '.join(sorted(known))}"
                )
            if (name, key) in SECRET_KEYS:
                if not isinstance(value, str):
                    # Never echo a secret, not even a mistyped one.
                    raise ConfigError(
                        f"{origin.where(name, key)}: {name}.{key} must be a string (in quotes); value not shown"
                    )
            kwargs[key] = _coerce(value, hints[key], origin.where(name, key), f"{name}.{key}")
            choices = _CHOICES.get((name, key))
            if choices and kwargs[key] not in choices:
                raise ConfigError(
                    f"{origin.where(name, key)}: {name}.{key} = {kwargs[key]!r} is not one of {', '.join(choices)}"
                    f"{_did_you_mean(str(kwargs[key]), choices)}"
                )
        sections[name] = cls(**kwargs)
    # Imported here: hybrid.py builds every HybridConfig through this function.
    from redheart.config.hybrid import HybridConfig

    config = HybridConfig._from_sections(sections)
    _resolve_auto(config)
    _validate(config, origin)
    return config


MICRO_BATCHES_PER_STAGE = 4
"""Automatic micro-batch size aims at m >= 4 x stages micro-batches: 1F1B's bubble is
(p-1)/(m+p-1), 11% for 2 stages at m = 8 against 20% at m = 4 and 33% at m = 2."""


def auto_micro_batch_size(batch_size: int, num_stages: int) -> int:
    """The largest divisor of batch_size giving >= 4 x num_stages micro-batches (1 when none does)."""
    want = MICRO_BATCHES_PER_STAGE * num_stages
    for size in range(batch_size // want, 0, -1):
        if batch_size % size == 0:
            return size
    return 1


AUTO_KEYS = (("train", "micro_batch_size"),)
"""Keys whose 0 means "derive from the others"; the config remembers which ones it derived."""


def _resolve_auto(cfg: HybridConfig) -> None:
    """Fill the "auto" (0) values that depend on other keys, before validation sees them. The
    config remembers them, so a later change (``config.batch_size = 4``, ``replace``) derives them
    again instead of keeping a value chosen for the old batch."""
    t = cfg.train
    derived = set()
    if t.micro_batch_size == 0 and t.batch_size >= 1:
        t.micro_batch_size = auto_micro_batch_size(t.batch_size, 2)
        derived.add(("train", "micro_batch_size"))
    object.__setattr__(cfg, "_derived", frozenset(derived))


def _rederive(cfg: HybridConfig, raw: dict[str, dict[str, Any]], explicit: set[tuple[str, str]]) -> None:
    """Put "auto" back for the derived keys that the change does not set itself."""
    for key in getattr(cfg, "_derived", frozenset()):
        if key not in explicit:
            raw[key[0]][key[1]] = 0
