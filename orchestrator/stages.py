"""The pipeline's stages as data: one ordered list that the trainer, checkpoints, launcher and
metrics iterate over instead of writing ``("cpu_stage", "gpu_stage")`` out.

Each stage is a process of its own with its own shard directory in a checkpoint (``cpu/``,
``gpu/``); its position in the list is its pipeline rank, which the stage reports in Describe and
the handshake checks. Two stages by default; ``model.stage_layers`` with p entries gives p: the CPU
stage, p - 2 middle GPU stage processes (``gpu_stage_1`` ..., shards ``gpu1/`` ...) and the last,
which keeps the name ``gpu_stage`` and the shard ``gpu/`` (it holds the heads). Every GPU stage
process reads ``[gpu_stage]``; ``gpu_stage.rank`` tells it which one it is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str  # the service name: launcher key, report key ("cpu_stage", "gpu_stage_1", "gpu_stage")
    shard: str  # its directory inside a checkpoint step directory, and its short name ("cpu")
    rank: int  # its pipeline position, 0 first
    section_name: str = ""  # its config section (default: the name)
    num_stages: int = 2  # the length of the pipeline it is part of
    replica: int = 0  # which copy of the pipeline (parallel.data_parallel), 0 first

    @property
    def base_name(self) -> str:
        """The stage's name in replica 0: what the replicas of one stage share ("gpu_stage")."""
        return self.name.rsplit("_r", 1)[0] if self.replica else self.name

    @property
    def metric_label(self) -> str:
        """The ``stage`` label of its series: the shard name, with the replica after it ("cpu_r1")."""
        return f"{self.shard}_r{self.replica}" if self.replica else self.shard

    @property
    def label(self) -> str:
        """The name in messages and StageClient names: "cpu stage", "gpu stage 1"."""
        return self.name.replace("_", " ")

    @property
    def config_section(self) -> str:
        return self.section_name or self.base_name

    def section(self, config) -> Any:
        return getattr(config, self.config_section)

    def address(self, config) -> str:
        """Its configured address (remote mode): from the section's ``addresses`` list when it has
        one (the GPU stages replica by replica, each replica's in pipeline order), else its address."""
        if self.config_section == "gpu_stage" and config.gpu_stage.addresses:
            return config.gpu_stage.addresses[self.replica * (self.num_stages - 1) + self.rank - 1]
        if self.config_section == "cpu_stage" and config.cpu_stage.addresses:
            return config.cpu_stage.addresses[self.replica]
        return getattr(config, f"{self.base_name}_address")()

    def overrides(self) -> list[str]:
        """The ``--set`` overrides that make a GPU stage process this stage (more than two stages)."""
        if self.config_section != "gpu_stage" or self.num_stages == 2:
            return []
        return [f"gpu_stage.rank={self.rank}"]


STAGES: tuple[StageSpec, ...] = (
    StageSpec(name="cpu_stage", shard="cpu", rank=0),
    StageSpec(name="gpu_stage", shard="gpu", rank=1),
)
"""The two stages of the default pipeline, in order (see :func:`stage_specs` for more)."""

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_SHORT_NAMES: tuple[str, ...] = tuple(s.shard for s in STAGES)  # metric labels, report keys
_SHORT_BY_LABEL = {s.label: s.shard for s in STAGES}


def short_name(label: str) -> str:
    """ "cpu stage" (a StageClient's name, a key of StepOutcome.stage_timings) -> "cpu";
    "gpu stage 1" -> "gpu1"; a replica's "cpu stage r1" -> "cpu_r1"."""
    replica = re.fullmatch(r"(.+) r(\d+)", label)
    if replica:
        return f"{short_name(replica.group(1))}_r{replica.group(2)}"
    middle = re.fullmatch(r"gpu stage (\d+)", label)
    if middle:
        return f"gpu{middle.group(1)}"
    return _SHORT_BY_LABEL.get(label, label.split()[0])


def plan_inputs(rank: int, num_stages: int) -> tuple[str, ...]:
    """The batch tensors the plan of stage `rank` carries: token ids for the first (it embeds them),
    every head's labels for the last (it holds the heads), the attention mask for all."""
    from redheart.heads import label_keys  # read at use: a registered head's labels travel too

    first = ("input_ids",) if rank == 0 else ()
    last = label_keys() if rank == num_stages - 1 else ()
    return (*first, "attention_mask", *last)


def stage_links(addresses: list[str], regret_address: str) -> list[dict[str, str]]:
    """StartRun's peer addresses of each stage, in pipeline order: the next stage's, the previous
    one's; only the last stage talks to the regret service."""
    last = len(addresses) - 1
    return [
        dict(
            next_address="" if i == last else addresses[i + 1],
            prev_address="" if i == 0 else addresses[i - 1],
            regret_address=regret_address if i == last else "",
        )
        for i in range(len(addresses))
    ]


def stage_specs(config=None) -> tuple[StageSpec, ...]:
    """Every stage process of a run: the pipeline (two stages, or one per entry of
    ``model.stage_layers``) once per replica (``parallel.data_parallel``), replica by replica.
    Replica 0 keeps the plain names; replica k's are suffixed ``_r<k>`` ("cpu_stage_r1")."""
    chain = _pipeline(config)
    replicas = config.parallel.data_parallel if config is not None else 1
    if replicas == 1:
        return chain
    return tuple(
        dataclasses.replace(s, name=f"{s.name}_r{k}" if k else s.name, replica=k)
        for k in range(replicas)
        for s in chain
    )


def _pipeline(config) -> tuple[StageSpec, ...]:
    """One replica's stages, in pipeline order."""
    count = len(config.model.stage_layers) if config is not None else 0
    if count <= 2:
        return STAGES
    middle = tuple(
        StageSpec(name=f"gpu_stage_{r}", shard=f"gpu{r}", rank=r, section_name="gpu_stage", num_stages=count)
        for r in range(1, count - 1)
    )
    first = StageSpec(name="cpu_stage", shard="cpu", rank=0, num_stages=count)
    last = StageSpec(name="gpu_stage", shard="gpu", rank=count - 1, num_stages=count)
    return (first, *middle, last)
