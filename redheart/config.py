"""The one configuration loader.

A run is described by one TOML file (``hybrid.toml``) with a section per component. Each section
maps to a dataclass below; every field has a docstring-style comment saying what it does. Values are
resolved with this precedence, highest first::

    command line (--set section.key=value, --output-dir)  >  environment (REDHEART_SECTION__KEY)
    >  the TOML file  >  the defaults below

Loading refuses unknown keys (with a "did you mean"), wrong types and impossible combinations,
naming the file and line, the values involved and the fix. Each service reads the whole file but
uses only its own section plus ``[model]``; the model section is fingerprinted so the orchestrator
can refuse stages that were started with different model settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class ConfigError(ValueError):
    """A configuration problem; the message names where it is and how to fix it."""


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    preset: str = "small"
    """Model shape preset: tiny (<2M, tests), small (the demo), base (~200M), or custom."""
    target_params: int | None = None
    """Pick a shape with about this many parameters (overrides the preset's shape)."""
    hidden_size: int | None = None
    """Width of the transformer (None: from the preset / target_params)."""
    num_layers: int | None = None
    """Number of transformer layers over both stages."""
    num_heads: int | None = None
    """Attention heads per layer; must divide hidden_size."""
    ffn_size: int | None = None
    """Feed-forward inner width (None: 4 x hidden_size)."""
    vocab_size: int | None = None
    """Tokenizer / embedding vocabulary size."""
    max_seq_len: int | None = None
    """Longest token sequence; longer texts are truncated and counted."""
    dropout: float = 0.0
    """Dropout probability. Deterministic per (seed, step, micro-batch, stage), so pipelined == single process."""
    gpu_layers_ratio: float | str = 0.6
    """Share of transformer layers on the GPU stage (0.6: 40% on the CPU, as designed), or "auto"."""
    cpu_layers: int | None = None
    """Explicit number of transformer layers on the CPU stage (overrides gpu_layers_ratio)."""
    init_seed: int = 0
    """Seed of the weight initialisation; every stage initialises its own layers from it."""
    init_from: str = ""
    """An exported model folder (redheart-export) to start from instead of the seeded initialisation: each stage loads its own parameters from its model.safetensors by global name, so the split may differ from the one it was trained at; the shape must match this section, and the run uses the folder's tokenizer. Empty: seeded initialisation."""


@dataclass
class DataConfig:
    path: str = "runs/data/scenarios.jsonl"
    """JSONL scenarios (see docs/data.md). Relative paths are relative to the working directory."""
    generate_if_missing: bool = True
    """When `path` does not exist, write the bundled generated corpus there first."""
    generated_count: int = 28882
    """Scenarios the bundled generator writes (the original corpus size)."""
    max_scenarios: int = 0
    """Use only the first N scenarios of the file (0: all)."""
    validation_fraction: float = 0.1
    """Share of scenarios held out for validation (split by a hash of the id); unused with validation_path."""
    validation_path: str = ""
    """A separate JSONL file to validate on (every scenario of it); the whole of `path` is then the training split. Empty: hold out validation_fraction of `path`."""
    seed: int = 0
    """Seed of the split and of the per-epoch shuffling."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per `source` (the original data_folder_weights); unlisted sources weigh 1."""
    skip_invalid: bool = False
    """Skip invalid lines (reporting how many) instead of refusing to start."""
    tokenizer_path: str = ""
    """A trained tokenizer JSON to reuse; empty: train one from the training split into the run directory."""
    length_bucketing: bool = False
    """Group samples of similar length into the same optimizer step (less padding), deterministic
    from (seed, epoch) so resume and --verify stay exact."""
    bucket_window: int = 64
    """With length_bucketing: optimizer steps' worth of samples sorted by length together; the steps
    of a window are then shuffled (larger: less padding, less randomness in step composition)."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    batch_size: int = 8
    """Samples per accumulation round (split into micro-batches)."""
    micro_batch_size: int = 0
    """Samples per micro-batch; batch_size / micro_batch_size micro-batches flow through the pipeline.
    0 (auto): the largest divisor of batch_size that still gives at least 4 micro-batches per
    pipeline stage (1F1B's bubble is (p-1)/(m+p-1): 11% at m = 8 for 2 stages, 33% at m = 2)."""
    pad_to_multiple_of: int = 8
    """Each micro-batch is padded only to its longest sequence, rounded up to this multiple
    (0: pad every sample to model.max_seq_len, as before length-aware batching)."""
    gradient_accumulation_steps: int = 1
    """Accumulation rounds per optimizer step; the effective batch is batch_size x this."""
    learning_rate: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler_type: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to learning_rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of learning_rate (cosine / linear)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip over both stages (0: no clipping)."""
    use_mixed_precision: bool = False
    """Mixed precision: bf16 autocast on CPU; on CUDA as train.mixed_precision_dtype chooses."""
    mixed_precision_dtype: str = "auto"
    """Autocast dtype on CUDA: auto (bf16 where the GPU has it natively, compute capability >= 8.0, else fp16 with loss scaling), bf16 (refused below 8.0, where it is emulated) or fp16."""
    allow_tf32: bool = True
    """Let fp32 matmuls use TF32 tensor cores on GPUs with compute capability >= 8.0."""
    max_consecutive_skips: int = 32
    """fp16: stop the run after this many consecutive steps skipped for overflow (0: no limit)."""
    initial_loss_scale: float = 65536.0
    """fp16: the dynamic loss scale's start (halved on overflow, doubled after 2000 good steps)."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b or gpipe."""
    seed: int = 0
    """Seed of dropout and any other randomness of training."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Weight per head loss (emotion, bentham, judgment, regret); unlisted heads weigh 1."""
    log_every_n_steps: int = 5
    """A log line (and report entry) every N optimizer steps."""
    eval_every_epoch: bool = True
    """Evaluate on the validation split after each epoch (always at the end)."""


@dataclass
class RegretConfig:
    enabled: bool = True
    """Train the regret head toward the regret service's counterfactual regret."""
    regrets_per_step: int = 7
    """Counterfactual actions per scenario."""
    bentham_per_regret: int = 3
    """Perspectives each action is evaluated from (agent, affected, society)."""
    num_workers: int = 4
    """Worker processes of the regret service."""
    host: str = "127.0.0.1"
    """Interface the regret service binds."""
    port: int = 50053
    """Port the regret service listens on (0: any free port)."""
    address: str = ""
    """Where clients reach the service (empty: host:port). "inprocess" scores in the GPU stage itself."""
    metrics_port: int = 9103
    """Prometheus /metrics port of the regret service (0: disabled)."""
    max_batch: int = 4096
    """Largest batch one Score call may carry."""
    lookahead: int = 1
    """Extra forwards the last stage runs before the first backward, so regret calls overlap compute."""
    timeout_seconds: float = 30.0
    """Deadline of one Score call; the GPU stage retries within the step deadline."""
    cache_mb: int = 64
    """Memory (MiB, requests and responses) the regret service keeps to answer retried calls."""


@dataclass
class CpuStageConfig:
    host: str = "127.0.0.1"
    """Interface the CPU stage binds."""
    port: int = 50051
    """Port of the CPU stage (0: any free port)."""
    address: str = ""
    """Where the orchestrator and the GPU stage reach it (empty: host:port)."""
    metrics_port: int = 9101
    """Prometheus /metrics port (0: disabled)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    cpu_memory_gb: float = 128.0
    """Host memory budget of this stage; the pre-flight check refuses a model that cannot fit."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them."""


@dataclass
class GpuStageConfig:
    host: str = "127.0.0.1"
    """Interface the GPU stage binds."""
    port: int = 50052
    """Port of the GPU stage (0: any free port)."""
    address: str = ""
    """Where the orchestrator and the CPU stage reach it (empty: host:port)."""
    metrics_port: int = 9102
    """Prometheus /metrics port (0: disabled)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cuda, cuda:N or cpu."""
    threads: int = 0
    """torch intra-op threads when running on CPU (0: torch's default)."""
    gpu_memory_gb: float = 8.0
    """GPU memory budget; a split whose estimate exceeds it, or a card with less free memory, is refused."""
    enforce_memory_budget: bool = True
    """On CUDA, cap this process's allocator at gpu_memory_gb (torch.cuda.set_per_process_memory_fraction)."""
    empty_cache_every: int = 0
    """Free the CUDA caching allocator every N steps (0: never; freeing costs a device sync and re-allocation)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them."""


@dataclass
class WireConfig:
    codec: str = "raw"
    """Encoding of activations and gradients between stages: raw, fp16, bf16 or int8 (blockwise)."""
    max_message_mb: int = 512
    """gRPC send/receive limit on every channel and server (MiB)."""
    max_rank: int = 8
    """Largest tensor rank a service accepts."""
    max_concurrent_rpcs: int = 64
    """Concurrent RPCs a server accepts before answering RESOURCE_EXHAUSTED."""
    max_deadline_seconds: float = 3600.0
    """Longest `deadline_seconds` a RunStep may ask for (how long a stage may wait on its peer);
    must be at least orchestrator.step_deadline_seconds."""
    max_plan_samples: int = 4096
    """Most samples (all micro-batches together) one RunStep plan may carry."""
    max_plan_tokens: int = 1048576
    """Most token positions (samples x positions, all micro-batches) one RunStep plan may carry."""
    max_early_pushes: int = 64
    """Tensors a stage keeps for a step or evaluation pass whose RunStep has not arrived yet."""
    max_error_chars: int = 200
    """Longest piece of a request (a name, a run id, a reason) echoed in an error message."""
    retry_max_attempts: int = 5
    """gRPC retry policy of idempotent calls: attempts in all, 1 to 5 (gRPC's cap; 1: no retries)."""
    retry_initial_backoff_seconds: float = 0.05
    """Backoff before the first retry (gRPC draws each delay at random up to the current backoff)."""
    retry_max_backoff_seconds: float = 2.0
    """Largest backoff between retries."""
    retry_backoff_multiplier: float = 2.0
    """Growth of the backoff from one retry to the next."""
    retry_status_codes: str = "UNAVAILABLE"
    """Comma-separated gRPC status codes to retry idempotent calls on, e.g. "UNAVAILABLE,RESOURCE_EXHAUSTED"."""


@dataclass
class SecurityConfig:
    tls_cert: str = ""
    """This process's certificate chain (PEM). Servers present it; with require_client_cert, clients present it too. Empty: no TLS (plaintext, as on loopback). Relative paths (here and below) are relative to the working directory. See docs/security.md."""
    tls_key: str = ""
    """Unencrypted PEM private key of tls_cert; keep it readable by the service's user only (chmod 600)."""
    tls_ca: str = ""
    """CA bundle (PEM) that signed the peers' certificates: clients verify servers with it and, with require_client_cert, servers verify clients. Setting it alone makes a client-only TLS config (e.g. the orchestrator in remote mode)."""
    require_client_cert: bool = False
    """Mutual TLS: servers refuse clients without a certificate signed by tls_ca (needs tls_cert, tls_key and tls_ca on every process)."""
    tls_server_name: str = ""
    """Name to check in the server certificate instead of the host of the address, e.g. when connecting by IP to a certificate issued for a hostname (empty: the address's host)."""
    token: str = field(default="", repr=False)
    """Shared secret every call must carry as `authorization: Bearer <token>` (empty: off); compared in constant time, never logged or written to the run directory. Prefer token_file or the REDHEART_SECURITY__TOKEN environment variable to writing it here or in --set (visible in `ps`). The gRPC health service is exempt."""
    token_file: str = ""
    """Read the token from this file (surrounding whitespace stripped) instead of `token`; either, not both."""

    @property
    def tls_enabled(self) -> bool:
        """Clients use TLS when a CA or a certificate is configured; servers need tls_cert and tls_key."""
        return bool(self.tls_cert or self.tls_ca)

    def resolved_token(self) -> str:
        """The shared token (from `token` or `token_file`), or "" when token authentication is off."""
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        return ""

    def describe(self) -> str:
        """A log-safe summary of the mode, e.g. "mTLS + token" (never the token itself)."""
        parts = []
        if self.tls_enabled:
            parts.append("mTLS" if self.require_client_cert else "TLS")
        else:
            parts.append("plaintext")
        if self.token or self.token_file:
            parts.append("token")
        return " + ".join(parts)


@dataclass
class OrchestratorConfig:
    output_dir: str = "runs/demo"
    """Where the run writes its report, tokenizer, checkpoints and logs."""
    metrics_port: int = 9100
    """Prometheus /metrics port of the orchestrator (0: disabled)."""
    connect_timeout_seconds: float = 60.0
    """How long to wait for every service to report SERVING."""
    step_deadline_seconds: float = 600.0
    """Deadline of one accumulation round on a stage (and of waiting on a peer)."""
    rpc_timeout_seconds: float = 60.0
    """Deadline of the short control calls (describe, apply, save, load)."""
    lease_seconds: float = 10.0
    """A stage aborts a round whose RunStep call from the orchestrator ended (the orchestrator died
    or gave up) and was not retried within this many seconds, and is then free for a new run."""
    verify_steps: int = 3
    """Optimizer steps --verify compares against single-process training."""
    verify_rtol: float = 1e-5
    """Relative tolerance of --verify (torch's pipelining tests use 1e-5)."""
    verify_atol: float = 4e-5
    """Absolute tolerance of --verify."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal), bar, or log."""


@dataclass
class CheckpointConfig:
    save_checkpoint_every: int = 20
    """Coordinated checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a new manifest is written."""
    directory: str = ""
    """Where checkpoints go (empty: <output_dir>/checkpoints)."""
    max_load_mb: int = 4096
    """Refuse to load a checkpoint file above this size (MiB)."""


@dataclass
class MetricsConfig:
    enabled: bool = True
    """Serve Prometheus /metrics from every process."""
    host: str = "127.0.0.1"
    """Interface the metrics endpoints bind (0.0.0.0 to let a remote Prometheus scrape)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <output_dir>/tensorboard/ (needs the `tensorboard` extra)."""


@dataclass
class LaunchConfig:
    mode: str = "local"
    """local: the orchestrator starts the services itself; remote: it connects to their addresses."""
    ports: str = "auto"
    """auto: local services get free loopback ports; fixed: use the configured ports."""
    startup_timeout_seconds: float = 120.0
    """How long a locally started service may take to become healthy."""
    log_dir: str = ""
    """Where local services write their logs (empty: <output_dir>/logs)."""
    max_restarts: int = 3
    """Recoveries per run after a service dies or stops answering, in any phase (local: restart it; remote: wait for it); each try counts, also one cut short by another death."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "regret": RegretConfig,
    "cpu_stage": CpuStageConfig,
    "gpu_stage": GpuStageConfig,
    "wire": WireConfig,
    "security": SecurityConfig,
    "orchestrator": OrchestratorConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
    "launch": LaunchConfig,
}

# Values never shown in error messages and replaced by REDACTED wherever the configuration is written
# out (the run directory's config.toml, report.json, checkpoint manifests).
SECRET_KEYS: frozenset[tuple[str, str]] = frozenset({("security", "token")})
REDACTED = "<redacted>"

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "preset"): ("tiny", "small", "base", "custom"),
    ("train", "scheduler_type"): ("cosine", "linear", "constant"),
    ("train", "schedule"): ("1f1b", "gpipe"),
    ("train", "mixed_precision_dtype"): ("auto", "bf16", "fp16"),
    ("wire", "codec"): ("raw", "fp16", "bf16", "int8"),
    ("orchestrator", "progress"): ("auto", "bar", "log"),
    ("launch", "mode"): ("local", "remote"),
    ("launch", "ports"): ("auto", "fixed"),
}


# ----------------------------------------------------------------------------- root


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
        return self.cpu_stage.address or f"{_client_host(self.cpu_stage.host)}:{self.cpu_stage.port}"

    def gpu_stage_address(self) -> str:
        return self.gpu_stage.address or f"{_client_host(self.gpu_stage.host)}:{self.gpu_stage.port}"

    def regret_address(self) -> str:
        if not self.regret.enabled:
            return ""
        return self.regret.address or f"{_client_host(self.regret.host)}:{self.regret.port}"

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


def _client_host(host: str) -> str:
    # A server bound to every interface is reached on loopback from the same machine.
    return "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host


# ----------------------------------------------------------------------------- loading


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


class ConfigAttributeError(ConfigError, AttributeError):
    """An unknown or ambiguous flat attribute of HybridConfig (an AttributeError, so hasattr() works)."""


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


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


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


def _validate(cfg: HybridConfig, origin: _Origin) -> None:
    def fail(section: str, key: str, message: str) -> None:
        raise ConfigError(f"{origin.where(section, key)}: {message}")

    t = cfg.train
    if t.pad_to_multiple_of < 0:
        fail(
            "train",
            "pad_to_multiple_of",
            f"train.pad_to_multiple_of = {t.pad_to_multiple_of} must be >= 0 (0: pad to model.max_seq_len)",
        )
    for key in (
        "epochs",
        "batch_size",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "log_every_n_steps",
    ):
        if getattr(t, key) < 1:
            fail("train", key, f"train.{key} = {getattr(t, key)} must be at least 1")
    if t.max_steps < 0:
        fail("train", "max_steps", f"train.max_steps = {t.max_steps} must be >= 0 (0: no limit)")
    if t.batch_size % t.micro_batch_size:
        fail(
            "train",
            "batch_size",
            f"train.batch_size = {t.batch_size} is not divisible by train.micro_batch_size = {t.micro_batch_size} "
            f"(fix: make batch_size a multiple of micro_batch_size, e.g. {t.micro_batch_size * max(2, t.batch_size // t.micro_batch_size)})",
        )
    num_stages = 2
    if t.batch_size // t.micro_batch_size < num_stages:
        fail(
            "train",
            "micro_batch_size",
            f"{t.batch_size // t.micro_batch_size} micro-batches (batch_size {t.batch_size} / micro_batch_size "
            f"{t.micro_batch_size}) is fewer than the {num_stages} pipeline stages, so one stage would always idle "
            f"(fix: micro_batch_size <= {t.batch_size // num_stages})",
        )
    if t.learning_rate <= 0:
        fail("train", "learning_rate", f"train.learning_rate = {t.learning_rate} must be > 0")
    if t.weight_decay < 0:
        fail("train", "weight_decay", f"train.weight_decay = {t.weight_decay} must be >= 0")
    if not 0 <= t.min_lr_ratio <= 1:
        fail("train", "min_lr_ratio", f"train.min_lr_ratio = {t.min_lr_ratio} must be in [0, 1]")
    if not t.initial_loss_scale >= 1.0 or t.initial_loss_scale == float("inf"):
        fail(
            "train",
            "initial_loss_scale",
            f"train.initial_loss_scale = {t.initial_loss_scale} must be a finite number >= 1",
        )
    if t.max_consecutive_skips < 0:
        fail(
            "train",
            "max_consecutive_skips",
            f"train.max_consecutive_skips = {t.max_consecutive_skips} must be >= 0 (0: no limit)",
        )
    if t.max_grad_norm < 0:
        fail(
            "train", "max_grad_norm", f"train.max_grad_norm = {t.max_grad_norm} must be >= 0 (0: no clipping)"
        )
    from redheart.heads import head_names  # the head registry: built-in and registered heads

    for head in t.loss_weights:
        if head not in head_names():
            fail(
                "train",
                "loss_weights",
                f"train.loss_weights has unknown head `{head}`{_did_you_mean(head, head_names())}",
            )

    m = cfg.model
    if isinstance(m.gpu_layers_ratio, str):
        if m.gpu_layers_ratio != "auto":
            fail(
                "model",
                "gpu_layers_ratio",
                f'model.gpu_layers_ratio = {m.gpu_layers_ratio!r} must be a number in (0, 1] or "auto"',
            )
    elif not 0 < m.gpu_layers_ratio <= 1:
        fail("model", "gpu_layers_ratio", f"model.gpu_layers_ratio = {m.gpu_layers_ratio} must be in (0, 1]")
    if not 0 <= m.dropout < 1:
        fail("model", "dropout", f"model.dropout = {m.dropout} must be in [0, 1)")
    try:
        from redheart.model import resolve_model_shape

        resolve_model_shape(m)
    except ValueError as exc:
        fail("model", "preset", str(exc))

    d = cfg.data
    if not 0 < d.validation_fraction < 1:
        fail(
            "data",
            "validation_fraction",
            f"data.validation_fraction = {d.validation_fraction} must be in (0, 1)",
        )
    if d.max_scenarios < 0:
        fail("data", "max_scenarios", f"data.max_scenarios = {d.max_scenarios} must be >= 0")
    if d.bucket_window < 1:
        fail(
            "data",
            "bucket_window",
            f"data.bucket_window = {d.bucket_window} must be at least 1 (optimizer steps per window)",
        )
    if d.validation_path and Path(d.validation_path).resolve() == Path(d.path).resolve():
        fail(
            "data",
            "validation_path",
            f"data.validation_path = {d.validation_path!r} is data.path itself: validating on the "
            "training data measures nothing (fix: a separate file, or leave it empty for the hash split)",
        )
    for source, weight in d.source_weights.items():
        if weight < 0:
            fail("data", "source_weights", f"data.source_weights.{source} = {weight} must be >= 0")

    r = cfg.regret
    for key in ("regrets_per_step", "bentham_per_regret", "num_workers", "max_batch"):
        if getattr(r, key) < 1:
            fail("regret", key, f"regret.{key} = {getattr(r, key)} must be at least 1")
    if r.bentham_per_regret > 3:
        fail(
            "regret",
            "bentham_per_regret",
            f"regret.bentham_per_regret = {r.bentham_per_regret}: only 3 perspectives exist (agent, affected, society)",
        )
    if r.lookahead < 0:
        fail("regret", "lookahead", f"regret.lookahead = {r.lookahead} must be >= 0")
    if r.max_batch < t.micro_batch_size:
        fail(
            "regret",
            "max_batch",
            f"regret.max_batch = {r.max_batch} is below train.micro_batch_size = {t.micro_batch_size}",
        )

    g = cfg.gpu_stage
    if g.device not in ("auto", "cpu", "cuda") and not g.device.startswith("cuda:"):
        fail(
            "gpu_stage",
            "device",
            f'gpu_stage.device = {g.device!r} must be "auto", "cpu", "cuda" or "cuda:N"',
        )
    if g.gpu_memory_gb <= 0:
        fail("gpu_stage", "gpu_memory_gb", f"gpu_stage.gpu_memory_gb = {g.gpu_memory_gb} must be > 0")
    if cfg.cpu_stage.cpu_memory_gb <= 0:
        fail(
            "cpu_stage",
            "cpu_memory_gb",
            f"cpu_stage.cpu_memory_gb = {cfg.cpu_stage.cpu_memory_gb} must be > 0",
        )
    for section in ("cpu_stage", "gpu_stage", "regret"):
        sec = getattr(cfg, section)
        if not 0 <= sec.port <= 65535:
            fail(section, "port", f"{section}.port = {sec.port} must be in 0..65535")
        if not 0 <= sec.metrics_port <= 65535:
            fail(section, "metrics_port", f"{section}.metrics_port = {sec.metrics_port} must be in 0..65535")
    if cfg.launch.mode == "remote":
        for section in ("cpu_stage", "gpu_stage"):
            if getattr(cfg, section).port == 0 and not getattr(cfg, section).address:
                fail(
                    section,
                    "port",
                    f'launch.mode = "remote" needs {section}.address or a fixed {section}.port',
                )
    if cfg.wire.max_message_mb < 1:
        fail("wire", "max_message_mb", f"wire.max_message_mb = {cfg.wire.max_message_mb} must be >= 1")
    if cfg.wire.max_rank < 1:
        fail("wire", "max_rank", f"wire.max_rank = {cfg.wire.max_rank} must be >= 1")
    if cfg.wire.max_concurrent_rpcs < 1:
        fail(
            "wire",
            "max_concurrent_rpcs",
            f"wire.max_concurrent_rpcs = {cfg.wire.max_concurrent_rpcs} must be >= 1",
        )
    _validate_retry(cfg.wire, fail)
    _validate_security(cfg, fail)
    c = cfg.checkpoint
    if c.save_checkpoint_every < 0:
        fail(
            "checkpoint",
            "save_checkpoint_every",
            f"checkpoint.save_checkpoint_every = {c.save_checkpoint_every} must be >= 0",
        )
    if c.keep_last < 1:
        fail("checkpoint", "keep_last", f"checkpoint.keep_last = {c.keep_last} must be >= 1")
    if cfg.launch.max_restarts < 0:
        fail("launch", "max_restarts", f"launch.max_restarts = {cfg.launch.max_restarts} must be >= 0")
    o = cfg.orchestrator
    for key in ("verify_rtol", "verify_atol"):
        if getattr(o, key) < 0:
            fail("orchestrator", key, f"orchestrator.{key} = {getattr(o, key)} must be >= 0")
    if o.verify_steps < 1:
        fail("orchestrator", "verify_steps", f"orchestrator.verify_steps = {o.verify_steps} must be >= 1")
    for key in ("connect_timeout_seconds", "step_deadline_seconds", "rpc_timeout_seconds", "lease_seconds"):
        if getattr(o, key) <= 0:
            fail("orchestrator", key, f"orchestrator.{key} = {getattr(o, key)} must be > 0")
    w = cfg.wire
    if not w.max_deadline_seconds > 0:
        fail(
            "wire",
            "max_deadline_seconds",
            f"wire.max_deadline_seconds = {w.max_deadline_seconds} must be > 0",
        )
    if o.step_deadline_seconds > w.max_deadline_seconds:
        fail(
            "orchestrator",
            "step_deadline_seconds",
            f"orchestrator.step_deadline_seconds = {o.step_deadline_seconds} is above wire.max_deadline_seconds = "
            f"{w.max_deadline_seconds}: the stages would refuse every step (fix: raise wire.max_deadline_seconds)",
        )
    for key in ("max_plan_samples", "max_plan_tokens", "max_early_pushes"):
        if getattr(w, key) < 1:
            fail("wire", key, f"wire.{key} = {getattr(w, key)} must be at least 1")
    if w.max_error_chars < 16:
        fail("wire", "max_error_chars", f"wire.max_error_chars = {w.max_error_chars} must be at least 16")
    if w.max_plan_samples < cfg.train.batch_size:
        fail(
            "wire",
            "max_plan_samples",
            f"wire.max_plan_samples = {w.max_plan_samples} is below train.batch_size = "
            f"{cfg.train.batch_size}: the stages would refuse every step (fix: raise wire.max_plan_samples)",
        )
    if cfg.regret.cache_mb < 0:
        fail("regret", "cache_mb", f"regret.cache_mb = {cfg.regret.cache_mb} must be >= 0 (0: no cache)")


def _validate_retry(w: WireConfig, fail) -> None:
    if not 1 <= w.retry_max_attempts <= 5:
        fail(
            "wire",
            "retry_max_attempts",
            f"wire.retry_max_attempts = {w.retry_max_attempts} must be in 1..5 "
            "(gRPC caps retry policies at 5 attempts; 1 turns retries off)",
        )
    for key in ("retry_initial_backoff_seconds", "retry_max_backoff_seconds", "retry_backoff_multiplier"):
        if not getattr(w, key) > 0:
            fail("wire", key, f"wire.{key} = {getattr(w, key)} must be > 0")
    if w.retry_max_backoff_seconds < w.retry_initial_backoff_seconds:
        fail(
            "wire",
            "retry_max_backoff_seconds",
            f"wire.retry_max_backoff_seconds = {w.retry_max_backoff_seconds} is below "
            f"wire.retry_initial_backoff_seconds = {w.retry_initial_backoff_seconds}",
        )
    from redheart.rpc import parse_status_codes

    try:
        parse_status_codes(w.retry_status_codes)
    except ValueError as exc:
        fail("wire", "retry_status_codes", f"wire.retry_status_codes: {exc}")


_TOKEN_HINT = "(fix: use printable ASCII without spaces, e.g. the output of `openssl rand -hex 32`)"


def _check_token_text(token: str) -> str | None:
    """Why a token cannot be used (it must travel in an HTTP/2 header), or None. Never quotes it."""
    if not token:
        return "is empty"
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        return f"contains spaces, control or non-ASCII characters {_TOKEN_HINT}"
    return None


def _check_pem_file(path: str, what: str, marker: str) -> str | None:
    """Why `path` cannot be used as a PEM `what` (missing, unreadable, wrong content), or None."""
    p = Path(path)
    if not p.exists():
        return f"file {path!r} does not exist"
    if not p.is_file():
        return f"{path!r} is not a file"
    try:
        text = p.read_bytes()
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if not marker:
        return None
    # "-----BEGIN CERTIFICATE-----"; keys: "-----BEGIN [RSA |EC |ENCRYPTED ]PRIVATE KEY-----".
    if f"{marker}-----".encode() not in text or b"-----BEGIN " not in text:
        return f"{path!r} is not a PEM {what} (no '-----BEGIN ...{marker}-----' line)"
    if marker == "PRIVATE KEY" and b"ENCRYPTED" in text:
        return (
            f"{path!r} is an encrypted private key; gRPC needs it unencrypted "
            f"(fix: `openssl pkey -in {path} -out key.pem`, then chmod 600 key.pem)"
        )
    return None


def _validate_security(cfg: HybridConfig, fail) -> None:
    s = cfg.security
    for key, what, marker in (
        ("tls_cert", "certificate", "CERTIFICATE"),
        ("tls_key", "private key", "PRIVATE KEY"),
        ("tls_ca", "CA certificate bundle", "CERTIFICATE"),
        ("token_file", "token file", ""),
    ):
        path = getattr(s, key)
        if path:
            problem = _check_pem_file(path, what, marker)
            if problem:
                fail("security", key, f"security.{key}: {problem}")
    if bool(s.tls_cert) != bool(s.tls_key):
        have, missing = ("tls_cert", "tls_key") if s.tls_cert else ("tls_key", "tls_cert")
        fail(
            "security",
            have,
            f"security.{have} is set but security.{missing} is not "
            "(fix: set both, the certificate and its private key)",
        )
    if s.require_client_cert:
        if not s.tls_ca:
            fail(
                "security",
                "require_client_cert",
                "security.require_client_cert = true needs security.tls_ca, "
                "the CA that signed the client certificates (fix: set tls_ca)",
            )
        if not s.tls_cert:
            fail(
                "security",
                "require_client_cert",
                "security.require_client_cert = true needs security.tls_cert and "
                "security.tls_key: every process presents its certificate (fix: set both)",
            )
    if s.tls_server_name and not s.tls_enabled:
        fail(
            "security",
            "tls_server_name",
            "security.tls_server_name is only used with TLS "
            "(fix: set security.tls_ca / tls_cert, or remove tls_server_name)",
        )
    if s.tls_ca and not s.tls_cert and cfg.launch.mode == "local":
        fail(
            "security",
            "tls_ca",
            'security.tls_ca turns TLS on, but launch.mode = "local" starts the services, '
            "which need security.tls_cert and security.tls_key to serve TLS (fix: set both)",
        )
    if s.token and s.token_file:
        fail("security", "token", "security.token and security.token_file are both set (fix: keep one)")
    if s.token:
        if s.token == REDACTED:
            fail(
                "security",
                "token",
                f'security.token is "{REDACTED}": this file is a written-out copy that never '
                "stores the token (fix: pass it with REDHEART_SECURITY__TOKEN or security.token_file)",
            )
        problem = _check_token_text(s.token)
        if problem:
            fail("security", "token", f"security.token {problem}")
    elif s.token_file:
        try:
            problem = _check_token_text(s.resolved_token())
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot be read as text ({type(exc).__name__})"
        if problem:
            fail("security", "token_file", f"the token in security.token_file {s.token_file!r} {problem}")
