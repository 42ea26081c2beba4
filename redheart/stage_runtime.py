"""Moved: the torch-side stage code now lives in the package redheart/stage/ (one job per file:
errors, mailbox, contracts, checks, optimizer, runtime, rounds, state_io, shards). This module
re-exports its names so existing imports keep working; new code imports from redheart.stage.*."""

from redheart.stage.checks import MAX_LEARNING_RATE, MAX_STEP  # noqa: F401
from redheart.stage.checks import check_plan_numbers as _check_plan_numbers  # noqa: F401
from redheart.stage.checks import check_settings as _check_settings  # noqa: F401
from redheart.stage.checks import is_real as _is_real  # noqa: F401
from redheart.stage.checks import short as _short  # noqa: F401
from redheart.stage.contracts import (  # noqa: F401
    ACTIVATION,
    EVAL_ACTIVATION,
    GRADIENT,
    AttemptLink,
    ForwardRecord,
    MicroBatchInputs,
    PeerLink,
    RoundContext,
    RoundPlan,
    RoundResult,
    StagePart,
)
from redheart.stage.errors import StageError, StepAborted  # noqa: F401
from redheart.stage.mailbox import Mailbox  # noqa: F401
from redheart.stage.optimizer import build_optimizer  # noqa: F401
from redheart.stage.runtime import CONTROL_WAIT_SECONDS, StageRuntime  # noqa: F401
from redheart.stage.shards import SHARD_FILES  # noqa: F401
from redheart.stage.state_io import load_init_weights as _load_init_weights  # noqa: F401
