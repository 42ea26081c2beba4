"""The one configuration loader.

A run is described by one TOML file (``hybrid.toml``) with a section per component. Each section
maps to a dataclass; every field has a docstring-style comment saying what it does. Values are
resolved with this precedence, highest first::

    command line (--set section.key=value, --output-dir)  >  environment (REDHEART_SECTION__KEY)
    >  the TOML file  >  the defaults of the sections

Loading refuses unknown keys (with a "did you mean"), wrong types and impossible combinations,
naming the file and line, the values involved and the fix. Each service reads the whole file but
uses only its own section plus ``[model]``; the model section is fingerprinted so the orchestrator
can refuse stages that were started with different model settings.

The package, one job per module (everything is importable from ``redheart.config`` as before):

* ``errors``: ConfigError, ConfigAttributeError and the "did you mean" hint;
* ``sections``: the schema, TOML section name -> dataclass, and keys limited to a few choices;
  the dataclasses with their own checks in ``training`` (model, data, train, checkpoint),
  ``services`` (regret, cpu_stage, gpu_stage, wire, orchestrator, metrics, launch) and ``security``;
* ``endpoints``: the rules of the host / port / address / metrics_port fields, once;
* ``hybrid``: HybridConfig (sections, flat attributes, TOML copy, derived values), fingerprints;
* ``loader``: load_config, environment and --set overrides, coercion, file:line, auto values;
* ``validation``: the rules that combine sections.
"""

# The imports below re-export every name importable from here before the split (some private, used
# by tests and tools); only __all__ is the public list.
# ruff: noqa: F401

from __future__ import annotations

from redheart.config.endpoints import SERVICE_SECTIONS, Endpoint, client_host, port_problem, split_address
from redheart.config.endpoints import client_host as _client_host
from redheart.config.errors import ConfigAttributeError, ConfigError, _did_you_mean
from redheart.config.hybrid import (
    HybridConfig,
    _flat_owner,
    _resolve_flat_key,
    _toml_value,
    diff_settings,
    fingerprint,
)
from redheart.config.loader import (
    AUTO_KEYS,
    MICRO_BATCHES_PER_STAGE,
    _build,
    _coerce,
    _find_line,
    _Origin,
    _parse_secret,
    _rederive,
    _resolve_auto,
    _split_dotted,
    _type_name,
    auto_micro_batch_size,
    load_config,
    parse_override,
    parse_override_value,
)
from redheart.config.sections import _CHOICES, SECTIONS
from redheart.config.security import (
    _TOKEN_HINT,
    REDACTED,
    SECRET_KEYS,
    SecurityConfig,
    _check_pem_file,
    _check_token_text,
)
from redheart.config.services import (
    CpuStageConfig,
    GpuStageConfig,
    LaunchConfig,
    MetricsConfig,
    OrchestratorConfig,
    RegretConfig,
    WireConfig,
)
from redheart.config.training import CheckpointConfig, DataConfig, ModelConfig, TrainConfig
from redheart.config.validation import _validate

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "RegretConfig",
    "CpuStageConfig",
    "GpuStageConfig",
    "OrchestratorConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "LaunchConfig",
    "WireConfig",
    "SecurityConfig",
    "HybridConfig",
    "load_config",
    "parse_override",
]
