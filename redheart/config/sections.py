"""The schema: which TOML section maps to which dataclass, and the keys limited to a few choices.

The dataclasses live by area: training.py (model, data, train, checkpoint), services.py (regret,
the stages, wire, orchestrator, metrics, launch) and security.py.
"""

from __future__ import annotations

from redheart.config.parallel import ParallelConfig
from redheart.config.security import SecurityConfig
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
    "parallel": ParallelConfig,
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "preset"): ("tiny", "small", "base", "custom"),
    ("train", "scheduler_type"): ("cosine", "linear", "constant"),
    ("train", "schedule"): ("1f1b", "gpipe"),
    ("train", "mixed_precision_dtype"): ("auto", "bf16", "fp16"),
    ("wire", "codec"): ("raw", "fp16", "bf16", "int8"),
    ("orchestrator", "progress"): ("auto", "bar", "log"),
    ("launch", "mode"): ("local", "remote"),
    ("launch", "ports"): ("auto", "fixed"),
    ("parallel", "dp_backend"): ("auto", "gloo", "nccl"),
}
