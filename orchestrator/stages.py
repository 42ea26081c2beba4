"""The pipeline's stages as data: one ordered list that the trainer, checkpoints, launcher and
metrics iterate over instead of writing ``("cpu_stage", "gpu_stage")`` out.

Each stage is a process of its own with its own config section (``[cpu_stage]``, ``[gpu_stage]``)
and its own shard directory in a checkpoint (``cpu/``, ``gpu/``); its position in the list is its
pipeline rank, which the stage reports in Describe and the handshake checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str  # the service name: config section, launcher key, report key
    shard: str  # its directory inside a checkpoint step directory, and its short name ("cpu")
    rank: int  # its pipeline position, 0 first

    @property
    def label(self) -> str:
        """The name in messages and StageClient names: "cpu stage"."""
        return self.name.replace("_", " ")

    def section(self, config) -> Any:
        return getattr(config, self.name)

    def address(self, config) -> str:
        """Its configured address (remote mode)."""
        return getattr(config, f"{self.name}_address")()


STAGES: tuple[StageSpec, ...] = (
    StageSpec(name="cpu_stage", shard="cpu", rank=0),
    StageSpec(name="gpu_stage", shard="gpu", rank=1),
)
"""The stages in pipeline order. Two today: `build_schedule` and the stage runtime are general in
the number of stages, the model split (`resolve_model_shape`) is not yet."""

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_SHORT_NAMES: tuple[str, ...] = tuple(s.shard for s in STAGES)  # metric labels, report keys
_SHORT_BY_LABEL = {s.label: s.shard for s in STAGES}


def short_name(label: str) -> str:
    """ "cpu stage" (a StageClient's name, a key of StepOutcome.stage_timings) -> "cpu"."""
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
    """The stage list of a run. Taking the config is where a config-driven split (more than two
    stages) will plug in; today every config has the same two."""
    return STAGES
