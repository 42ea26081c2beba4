"""HybridConfig: the whole configuration, one attribute per section, plus the prototype's flat attributes.

Also what is derived from a whole configuration for several processes: service addresses, the
model fingerprint that stages compare, the TOML copy written into every run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redheart.config.endpoints import Endpoint
from redheart.config.errors import ConfigAttributeError, ConfigError, _did_you_mean
from redheart.config.loader import _build, _Origin, _rederive, _split_dotted, load_config
from redheart.config.sections import (
    SECTIONS,
    CheckpointConfig,
    CpuStageConfig,
    DataConfig,
    GpuStageConfig,
    LaunchConfig,
    MetricsConfig,
    ModelConfig,
    OrchestratorConfig,
    ParallelConfig,
    RegretConfig,
    SecurityConfig,
    TrainConfig,
    WireConfig,
)
from redheart.config.security import REDACTED, SECRET_KEYS


class HybridConfig:
    """The whole configuration: one attribute per section.

    Mirrors the original prototype's flat constructor: any field whose name is unique across
    sections may be passed directly, e.g.::

        HybridConfig(target_params=200_000_000, gpu_memory_gb=8.0, cpu_memory_gb=128.0,
                     regrets_per_step=7, epochs=3, batch_size=8, num_workers=4,
                     use_mixed_precision=True)

    Sections can also be passed whole (``model=ModelConfig(...)``) or as dotted keys
    (``**{"train.batch_size": 16}``). The result is validated like a file.
    """

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    regret: RegretConfig
    cpu_stage: CpuStageConfig
    gpu_stage: GpuStageConfig
    wire: WireConfig
    security: SecurityConfig
    orchestrator: OrchestratorConfig
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    launch: LaunchConfig
    parallel: ParallelConfig

    def __init__(self, **kwargs: Any) -> None:
        raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in kwargs.items():
            if key in SECTIONS:
                if dataclasses.is_dataclass(value):
                    raw[key].update(dataclasses.asdict(value))
                elif isinstance(value, Mapping):
                    raw[key].update(value)
                else:
                    raise ConfigError(
                        f"HybridConfig({key}=...): expected a {SECTIONS[key].__name__} or a dict"
                    )
                continue
            section, name = _resolve_flat_key(key)
            raw[section][name] = value
        built = _build(raw, origin=_Origin("HybridConfig(...)"))
        for name in SECTIONS:
            setattr(self, name, getattr(built, name))
        object.__setattr__(self, "_derived", built._derived)

    # ---- the original flat attributes, both ways: `config.batch_size` reads and `config.batch_size = 4`
    # sets train.batch_size, validated like the constructor (the prototype's troubleshooting relies on it).

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, so sections, methods and properties never come here.
        if name.startswith("_") or name in SECTIONS:
            raise AttributeError(name)
        section, key = _flat_owner(name)
        return getattr(getattr(self, section), key)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SECTIONS or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if hasattr(type(self), name):
            owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
            hint = f" (fix: set config.{owners[0]}.{name})" if owners else ""
            raise AttributeError(
                f"HybridConfig.{name} is derived (a method or property) and cannot be assigned{hint}"
            )
        section, key = _flat_owner(name)
        raw = self.to_dict(redact_secrets=False)
        raw[section][key] = value
        _rederive(self, raw, {(section, key)})
        built = _build(raw, origin=_Origin(f"config.{name} = {value!r}"))
        object.__setattr__(self, "_derived", built._derived)
        # Update the section objects in place: code holding `config.train` sees the change too.
        for sec in SECTIONS:
            target, source = getattr(self, sec), getattr(built, sec)
            for f in dataclasses.fields(source):
                setattr(target, f.name, getattr(source, f.name))

    @classmethod
    def _from_sections(cls, sections: Mapping[str, Any]) -> HybridConfig:
        obj = cls.__new__(cls)
        for name in SECTIONS:
            setattr(obj, name, sections[name])
        return obj

    @classmethod
    def from_toml(
        cls,
        path: str | os.PathLike[str],
        overrides: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> HybridConfig:
        return load_config(path, overrides=overrides, env=env)

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, dict[str, Any]]:
        """Every section as plain dicts. Secrets (security.token) read "<redacted>" unless asked for."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        if redact_secrets:
            for section, key in SECRET_KEYS:
                if out[section].get(key):
                    out[section][key] = REDACTED
        return out

    def to_toml(self) -> str:
        """The resolved configuration as TOML (written into every run directory).

        A set security.token is written as "<redacted>", which loading refuses, so a copy of the
        file never carries the secret and never silently starts a service without it: the token
        has to come from REDHEART_SECURITY__TOKEN (the local launcher passes it that way).
        """
        lines: list[str] = []
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                if value is None:
                    lines.append(f"# {key} = (unset)")
                    continue
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def replace(self, **dotted: Any) -> HybridConfig:
        """A copy with some keys changed, e.g. ``cfg.replace(**{"train.max_steps": 4})``; validated."""
        raw = self.to_dict(redact_secrets=False)
        explicit = set()
        for key, value in dotted.items():
            section, name = _split_dotted(key) if "." in key else _resolve_flat_key(key)
            raw[section][name] = value
            explicit.add((section, name))
        _rederive(self, raw, explicit)
        return _build(raw, origin=_Origin("replace(...)"))

    # ---- derived values used by several processes

    @property
    def micro_batches(self) -> int:
        return self.train.batch_size // self.train.micro_batch_size

    def cpu_stage_address(self) -> str:
        return Endpoint.of("cpu_stage", self.cpu_stage).client_address()

    def gpu_stage_address(self) -> str:
        return Endpoint.of("gpu_stage", self.gpu_stage).client_address()

    def regret_address(self) -> str:
        if not self.regret.enabled:
            return ""
        return Endpoint.of("regret", self.regret).client_address()

    def output_dir(self) -> Path:
        return Path(self.orchestrator.output_dir)

    def checkpoint_dir(self) -> Path:
        return (
            Path(self.checkpoint.directory)
            if self.checkpoint.directory
            else self.output_dir() / "checkpoints"
        )

    def model_settings(self) -> dict[str, Any]:
        """The resolved model shape and split: what both stages must agree on."""
        from redheart.model import resolve_model_shape

        return dataclasses.asdict(resolve_model_shape(self.model))

    def model_fingerprint(self) -> str:
        return fingerprint(self.model_settings())

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={getattr(self, n)!r}" for n in SECTIONS)
        return f"HybridConfig({parts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HybridConfig) and self.to_dict(redact_secrets=False) == other.to_dict(
            redact_secrets=False
        )


def fingerprint(settings: Mapping[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def diff_settings(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Human-readable list of differing keys: ['num_layers: 4 here, 6 there', ...]."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            out.append(f"{key}: {mine.get(key)!r} here, {theirs.get(key)!r} there")
    return out


def _resolve_flat_key(key: str) -> tuple[str, str]:
    if "." in key:
        return _split_dotted(key)
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(
            f"HybridConfig({key}=...): `{key}` exists in several sections ({', '.join(owners)}); "
            f"pass it as a section, e.g. {owners[0]}={{'{key}': ...}}"
        )
    every = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    raise ConfigError(f"HybridConfig({key}=...): unknown setting{_did_you_mean(key, every)}")


def _flat_owner(name: str) -> tuple[str, str]:
    """The (section, key) a flat HybridConfig attribute stands for, or ConfigAttributeError."""
    owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) == 1:
        return owners[0], name
    if owners:
        raise ConfigAttributeError(
            f"HybridConfig.{name}: `{name}` exists in several sections ({', '.join(owners)}); "
            f"use the section, e.g. config.{owners[0]}.{name}"
        )
    every = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)] + list(SECTIONS)
    raise ConfigAttributeError(f"HybridConfig has no setting `{name}`{_did_you_mean(name, every)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))
