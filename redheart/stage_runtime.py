"""Torch-only logic of a pipeline stage: the part of the model it holds, its optimizer, and the
execution of its ordered schedule actions. No gRPC here: tensors arrive through a
:class:`Mailbox` and leave through a :class:`PeerLink` that the service layer provides.

The same class runs the CPU stage (first) and the GPU stage (last); what differs is the
:class:`StagePart` (cpu_stage/logic.py, gpu_stage/logic.py) that knows how to run a forward and a
backward of its modules.

Invariants kept here (design.md section 3):

* each micro-batch loss is multiplied by ``loss_multiplier = 1 / (micro-batches x accumulation
  steps)`` before backward; ``.grad`` is never rescaled afterwards;
* the gradient-norm² of this stage is reported after the last accumulation round; the optimizer
  only steps when the orchestrator sends the global clip coefficient (both stages or neither);
* every action is keyed by (run, step, micro-batch, kind): retries are idempotent, steps out of
  order are refused with a message naming step and micro-batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from redheart.config import TrainConfig, fingerprint
from redheart.model import ModelShape, derive_seed
from redheart.schedule import Action, build_schedule

log = logging.getLogger(__name__)

ACTIVATION, GRADIENT, EVAL_ACTIVATION = "activation", "gradient", "eval_activation"


class StageError(Exception):
    """A request this stage cannot serve. `kind` maps to a gRPC status in the servicer."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "precondition" | "invalid" | "deadline" | "aborted" | "unavailable" | "internal"


class StepAborted(StageError):
    def __init__(self, message: str) -> None:
        super().__init__("aborted", message)


# ----------------------------------------------------------------------------- messaging


class Mailbox:
    """Tensors pushed by the peer, keyed by (run, step, micro-batch, kind); waiters block on a condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int, int, str], torch.Tensor] = {}
        self._consumed: set[tuple[str, int, int, str]] = set()
        self._aborted: dict[tuple[str, int], str] = {}

    def put(self, key: tuple[str, int, int, str], tensor: torch.Tensor) -> bool:
        """Store; returns False when the key was already delivered (a duplicate to drop)."""
        with self._cond:
            if key in self._items or key in self._consumed:
                return False
            self._items[key] = tensor
            self._cond.notify_all()
            return True

    def get(self, key: tuple[str, int, int, str], timeout: float, describe: str) -> torch.Tensor:
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._items:
                reason = self._aborted.get((key[0], key[1]))
                if reason is not None:
                    raise StepAborted(f"step {key[1]} was aborted while waiting for {describe}: {reason}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StageError(
                        "deadline",
                        f"timed out after {timeout:.1f}s waiting for {describe} "
                        f"(step {key[1]}, micro-batch {key[2]}); is the peer stage alive?",
                    )
                self._cond.wait(min(remaining, 1.0))
            self._consumed.add(key)
            return self._items.pop(key)

    def abort(self, run_id: str, step: int, reason: str) -> None:
        with self._cond:
            self._aborted[(run_id, step)] = reason
            for key in [k for k in self._items if k[0] == run_id and k[1] == step]:
                del self._items[key]
            self._cond.notify_all()

    def aborted(self, run_id: str, step: int) -> str | None:
        with self._cond:
            return self._aborted.get((run_id, step))

    def clear_step(self, run_id: str, step: int, kinds: Sequence[str] | None = None) -> None:
        """Forget everything of a finished step (keeps memory bounded over a long run)."""
        with self._cond:
            for key in [k for k in self._items if k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds)]:
                del self._items[key]
            self._consumed = {k for k in self._consumed if not (k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds))}
            self._aborted.pop((run_id, step), None)

    def reset(self) -> None:
        with self._cond:
            self._items.clear()
            self._consumed.clear()
            self._aborted.clear()
            self._cond.notify_all()

    def pending_keys(self) -> list[tuple[str, int, int, str]]:
        with self._cond:
            return sorted(self._items)


class PeerLink(Protocol):
    """Sends tensors to the neighbouring stages. Implemented over gRPC in redheart/stage_service.py."""

    def send(self, direction: str, run_id: str, step: int, micro_batch: int, kind: str, tensor: torch.Tensor) -> None:
        """Queue a tensor for the next ("next") or previous ("prev") stage; returns at once."""

    def flush(self, timeout: float) -> None:
        """Block until every queued tensor was delivered; raise the first delivery error."""

    def stats(self) -> dict[str, float]:
        """Cumulative serialize_seconds, send_seconds, bytes_sent."""


# ----------------------------------------------------------------------------- stage parts


@dataclass
class MicroBatchInputs:
    index: int
    tensors: dict[str, torch.Tensor]
    sample_ids: list[str] = field(default_factory=list)


@dataclass
class ForwardRecord:
    """What a forward leaves for its backward."""

    output: torch.Tensor | None = None  # first stage: its output activation (graph attached)
    input_leaf: torch.Tensor | None = None  # later stages: the received activation (requires grad)
    head_outputs: dict[str, torch.Tensor] | None = None
    pending: Any = None  # last stage: the regret request in flight
    inputs: MicroBatchInputs | None = None


class StagePart(Protocol):
    """The model-specific half of a stage (cpu_stage/logic.py, gpu_stage/logic.py)."""

    name: str
    rank: int
    num_stages: int
    device: torch.device
    module: torch.nn.Module

    def forward(self, ctx: "RoundContext", mb: MicroBatchInputs) -> ForwardRecord: ...

    def backward(self, ctx: "RoundContext", mb: MicroBatchInputs, record: ForwardRecord) -> dict[str, Any]: ...

    def evaluate(self, ctx: "RoundContext", mb: MicroBatchInputs) -> dict[str, Any]: ...


@dataclass
class RoundPlan:
    run_id: str
    step: int
    accumulation_round: int
    accumulation_steps: int
    schedule: str
    micro_batches: list[MicroBatchInputs]
    loss_multiplier: float
    loss_scale: float = 1.0
    deadline_seconds: float = 600.0
    forward_only: bool = False
    lookahead: int = 0


@dataclass
class RoundContext:
    """Handed to the stage part for each action: where to send, how to wait, what to count."""

    plan: RoundPlan
    runtime: "StageRuntime"
    link: PeerLink
    started: float
    timings: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0, "wait": 0.0, "regret_wait": 0.0})
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)

    def receive(self, kind: str, micro_batch: int, describe: str) -> torch.Tensor:
        start = time.perf_counter()
        try:
            key = (self.plan.run_id, self.plan.step, micro_batch, kind)
            return self.runtime.mailbox.get(key, self.plan.deadline_seconds, describe)
        finally:
            end = time.perf_counter()
            self.timings["wait"] += end - start
            if end - start > 1e-4:
                self.spans.append(("wait", micro_batch, start - self.started, end - self.started))

    def global_micro_batch(self, local_index: int) -> int:
        return local_index

    def autocast(self):
        return self.runtime.autocast()


@dataclass
class RoundResult:
    run_id: str
    step: int
    accumulation_round: int
    micro_batches: list[dict[str, Any]]
    timings: dict[str, float]
    spans: list[tuple[str, int, float, float]]
    grad_norm_sq: float | None = None
    found_inf: bool = False
    peak_memory_bytes: int = 0


# ----------------------------------------------------------------------------- runtime


def build_optimizer(module: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases, norms and embeddings' rows are vectors: no decay)."""
    decay, no_decay = [], []
    for _name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same per-parameter arithmetic in every process, whatever the batch of params.
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        foreach=False,
    )


class StageRuntime:
    """One stage's state machine: start a run, run rounds, apply, abort, save, load."""

    def __init__(self, part_factory: Callable[[], StagePart], shape: ModelShape, *, mixed_precision_dtype=None) -> None:
        self._part_factory = part_factory
        self.shape = shape
        self.part: StagePart = part_factory()
        self.mailbox = Mailbox()
        self.lock = threading.RLock()  # one control operation at a time
        self.run_id = ""
        self.train = TrainConfig()
        self.settings: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.next_step = 0
        self.rounds_done = 0  # accumulation rounds completed for next_step
        self.current_plan: RoundPlan | None = None
        self.results: dict[tuple[str, int, int], RoundResult] = {}
        self.applied: dict[tuple[str, int], dict[str, Any]] = {}
        self.eval_passes = 0
        self.running = threading.Event()
        self.peers: dict[str, str] = {}
        self.regret_address = ""
        self.mixed_precision = False

    # ---- description

    @property
    def name(self) -> str:
        return self.part.name

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.part.module.parameters())

    def model_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.shape)

    def fingerprint(self) -> str:
        return fingerprint(self.model_settings())

    def autocast(self):
        if not self.mixed_precision:
            return torch.autocast(device_type=self.part.device.type, enabled=False)
        if self.part.device.type == "cuda":
            dtype = torch.bfloat16 if self.train_precision() == "bf16" else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)

    def train_precision(self) -> str:
        if not self.mixed_precision:
            return "fp32"
        if self.part.device.type == "cuda":
            return "bf16" if self.settings.get("cuda_bf16", False) and torch.cuda.is_bf16_supported() else "fp16"
        return "bf16"

    # ---- lifecycle

    def start_run(self, run_id: str, settings: Mapping[str, Any], *, reinitialize: bool, first_step: int,
                  peers: Mapping[str, str], regret_address: str) -> int:
        with self.lock:
            if self.running.is_set():
                raise StageError("precondition", f"cannot start run {run_id!r}: a step of run {self.run_id!r} is running")
            train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
            train = TrainConfig(**{k: v for k, v in dict(settings.get("train", {})).items() if k in train_fields})
            if reinitialize or self.optimizer is None:
                self.part = self._part_factory()
            self.train = train
            self.settings = dict(settings)
            self.mixed_precision = bool(train.use_mixed_precision)
            self.optimizer = build_optimizer(self.part.module, train) if reinitialize or self.optimizer is None or self.run_id != run_id else self.optimizer
            self.run_id = run_id
            self.next_step = first_step
            self.rounds_done = 0
            self.results.clear()
            self.applied.clear()
            self.mailbox.reset()
            self.peers = dict(peers)
            self.regret_address = regret_address
            self.part.module.train()
            if hasattr(self.part, "configure"):
                self.part.configure(settings, regret_address)
            log.info("%s stage: run %s starts at step %d (%d parameters, precision %s)",
                     self.name, run_id, first_step, self.num_parameters(), self.train_precision())
            return self.num_parameters()

    def _check_run(self, run_id: str) -> None:
        if not self.run_id:
            raise StageError("precondition", "no run started on this stage (the orchestrator must call StartRun first)")
        if run_id != self.run_id:
            raise StageError("precondition", f"run {run_id!r} is not the current run {self.run_id!r} of this stage")

    def check_push(self, run_id: str, step: int, micro_batch: int, kind: str) -> None:
        """Refuse tensors this stage cannot use, naming step and micro-batch."""
        self._check_run(run_id)
        expected = self.part.receives
        if kind not in expected:
            raise StageError("invalid", f"the {self.name} stage does not accept {kind} tensors (it receives {', '.join(sorted(expected))})")
        if micro_batch < 0:
            raise StageError("invalid", f"micro-batch {micro_batch} is negative")
        if kind == EVAL_ACTIVATION:
            return
        if step < self.next_step:
            raise StageError("precondition", f"step {step} micro-batch {micro_batch}: step {step} is already applied on this stage (next step is {self.next_step})")
        if step > self.next_step:
            raise StageError("precondition", f"step {step} micro-batch {micro_batch}: this stage is at step {self.next_step}; step {step} is unknown")
        plan = self.current_plan
        limit = (plan.accumulation_steps * len(plan.micro_batches)) if plan is not None and plan.step == step else 1 << 16
        if micro_batch >= limit:
            raise StageError("precondition", f"step {step} micro-batch {micro_batch}: unknown micro-batch (the step has {limit})")

    def run_round(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        """Run this stage's actions for one accumulation round (or an evaluation pass)."""
        with self.lock:
            self._check_run(plan.run_id)
            if plan.forward_only:
                return self._run_eval(plan, link)
            key = (plan.run_id, plan.step, plan.accumulation_round)
            if key in self.results:
                return self.results[key]  # a retried RunStep: same answer, no recompute
            if plan.step != self.next_step:
                raise StageError("precondition", f"RunStep for step {plan.step} round {plan.accumulation_round}, but this stage expects step {self.next_step}")
            if plan.accumulation_round != self.rounds_done:
                raise StageError(
                    "precondition",
                    f"RunStep for step {plan.step} accumulation round {plan.accumulation_round}, but {self.rounds_done} round(s) of it are done",
                )
            if not plan.micro_batches:
                raise StageError("invalid", f"step {plan.step}: the plan has no micro-batches")
            self.current_plan = plan
            self.running.set()
            try:
                result = self._run_train_round(plan, link)
            except BaseException:
                self._discard_step_state(plan.step)
                raise
            finally:
                self.running.clear()
            self.results[key] = result
            self.rounds_done += 1
            return result

    def _discard_step_state(self, step: int) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.rounds_done = 0
        self.results = {k: v for k, v in self.results.items() if k[1] != step}
        self.mailbox.clear_step(self.run_id, step)
        if hasattr(self.part, "discard"):
            self.part.discard()

    def _run_train_round(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        assert self.optimizer is not None
        if plan.accumulation_round == 0:
            self.optimizer.zero_grad(set_to_none=True)
        m = len(plan.micro_batches)
        order = build_schedule(plan.schedule, self.part.num_stages, m, extra_warmup=plan.lookahead)[self.part.rank]
        started = time.perf_counter()
        ctx = RoundContext(plan=plan, runtime=self, link=link, started=started)
        records: dict[int, ForwardRecord] = {}
        per_mb: dict[int, dict[str, Any]] = {}
        if self.part.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.part.device)
        for action in order:
            mb = plan.micro_batches[action.micro_batch]
            t0 = time.perf_counter()
            if action.op == "F":
                # Dropout is seeded by (seed, step, micro-batch, stage): the single-process
                # reference seeds the same way, so both draw the same masks.
                torch.manual_seed(derive_seed(self.train.seed, plan.step, mb.index, self.part.rank))
                records[action.micro_batch] = self.part.forward(ctx, mb)
                t1 = time.perf_counter()
                ctx.timings["forward"] += t1 - t0
            else:
                record = records.pop(action.micro_batch)
                per_mb[action.micro_batch] = self.part.backward(ctx, mb, record)
                t1 = time.perf_counter()
                ctx.timings["backward"] += t1 - t0
            ctx.spans.append((action.op, mb.index, t0 - started, t1 - started))
        flush_start = time.perf_counter()
        link.flush(plan.deadline_seconds)
        ctx.timings["wait"] += time.perf_counter() - flush_start
        ctx.timings["total"] = time.perf_counter() - started
        result = RoundResult(
            run_id=plan.run_id,
            step=plan.step,
            accumulation_round=plan.accumulation_round,
            micro_batches=[dict(per_mb[i], index=plan.micro_batches[i].index) for i in range(m)],
            timings=ctx.timings,
            spans=ctx.spans,
        )
        if plan.accumulation_round == plan.accumulation_steps - 1:
            norm_sq, found_inf = self._grad_norm_sq(plan.loss_scale)
            result.grad_norm_sq = norm_sq
            result.found_inf = found_inf
        if self.part.device.type == "cuda":
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(self.part.device)
        return result

    @torch.no_grad()
    def _grad_norm_sq(self, loss_scale: float) -> tuple[float, bool]:
        # Per-tensor norms (as torch.nn.utils.clip_grad_norm_ computes them), summed in float64:
        # no full-size temporary copies of the gradients.
        norms = [torch.linalg.vector_norm(p.grad.detach()) for p in self.part.module.parameters() if p.grad is not None]
        total = sum(float(n) ** 2 for n in torch.stack(norms).double().cpu()) if norms else 0.0
        value = total / (loss_scale * loss_scale)
        return value, not math.isfinite(value)

    def _run_eval(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        started = time.perf_counter()
        ctx = RoundContext(plan=plan, runtime=self, link=link, started=started)
        self.part.module.eval()
        outputs = []
        try:
            with torch.no_grad():
                for mb in plan.micro_batches:
                    t0 = time.perf_counter()
                    outputs.append(dict(self.part.evaluate(ctx, mb), index=mb.index))
                    ctx.timings["forward"] += time.perf_counter() - t0
            link.flush(plan.deadline_seconds)
        finally:
            self.part.module.train()
            self.mailbox.clear_step(plan.run_id, plan.step, kinds=[EVAL_ACTIVATION])
        ctx.timings["total"] = time.perf_counter() - started
        return RoundResult(plan.run_id, plan.step, 0, outputs, ctx.timings, ctx.spans)

    def apply(self, run_id: str, step: int, clip_coefficient: float, learning_rate: float, skip: bool,
              loss_scale: float = 1.0) -> dict[str, Any]:
        with self.lock:
            self._check_run(run_id)
            if (run_id, step) in self.applied:
                return self.applied[(run_id, step)]  # retried ApplyStep: already done
            if step != self.next_step:
                raise StageError("precondition", f"ApplyStep for step {step}, but this stage is at step {self.next_step}")
            plan = self.current_plan
            needed = plan.accumulation_steps if plan is not None and plan.step == step else None
            if needed is None or self.rounds_done != needed:
                raise StageError(
                    "precondition",
                    f"ApplyStep for step {step}: {self.rounds_done} of {needed or '?'} accumulation round(s) ran on this stage",
                )
            if not (math.isfinite(clip_coefficient) and clip_coefficient >= 0):
                raise StageError("invalid", f"ApplyStep for step {step}: clip coefficient {clip_coefficient} is not a finite number >= 0")
            if not (math.isfinite(learning_rate) and learning_rate >= 0):
                raise StageError("invalid", f"ApplyStep for step {step}: learning rate {learning_rate} is not a finite number >= 0")
            start = time.perf_counter()
            assert self.optimizer is not None
            if not skip:
                factor = clip_coefficient / loss_scale
                if factor != 1.0:
                    with torch.no_grad():
                        for p in self.part.module.parameters():
                            if p.grad is not None:
                                p.grad.mul_(factor)
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.next_step = step + 1
            self.rounds_done = 0
            self.results = {k: v for k, v in self.results.items() if k[1] > step}
            self.mailbox.clear_step(run_id, step)
            self.current_plan = None
            out = {"next_step": self.next_step, "seconds": time.perf_counter() - start, "applied": not skip}
            self.applied = {k: v for k, v in self.applied.items() if k[1] > step - 4}
            self.applied[(run_id, step)] = out
            if self.part.device.type == "cuda" and self.settings.get("empty_cache_every", 0):
                if self.next_step % int(self.settings["empty_cache_every"]) == 0:
                    torch.cuda.empty_cache()
            return out

    def abort(self, run_id: str, step: int, reason: str) -> None:
        """Wake anything waiting on the peer for this step; the step's partial state is discarded."""
        self.mailbox.abort(run_id, step, reason)
        if not self.running.is_set():
            with self.lock:
                if run_id == self.run_id and step == self.next_step:
                    self._discard_step_state(step)
                    self.mailbox.clear_step(run_id, step)

    # ---- parameters and checkpoints

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.part.module.global_named_parameters()]

    def save(self, run_id: str, step: int, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write this stage's shard: weights and optimizer tensors as safetensors, the rest as JSON."""
        with self.lock:
            self._check_run(run_id)
            if self.running.is_set():
                raise StageError("precondition", f"cannot save at step {step}: a step is running")
            if step != self.next_step:
                raise StageError("precondition", f"SaveState for step {step}, but this stage has completed {self.next_step} steps")
            start = time.perf_counter()
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            params = {n: p.detach().to("cpu").contiguous() for n, p in self.named_parameters()}
            weights_path = out / "weights.safetensors"
            _atomic_save_tensors(params, weights_path)
            opt_tensors, opt_meta = self._optimizer_state()
            _atomic_save_tensors(opt_tensors, out / "optimizer.safetensors")
            rng = {"torch_cpu": torch.get_rng_state()}
            if self.part.device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(self.part.device)
            _atomic_save_tensors(rng, out / "rng.safetensors")
            meta = {
                "stage": self.name,
                "run_id": run_id,
                "step": step,
                "model_fingerprint": self.fingerprint(),
                "model_settings": self.model_settings(),
                "optimizer": opt_meta,
                "files": {},
            }
            total = 0
            for f in ("weights.safetensors", "optimizer.safetensors", "rng.safetensors"):
                data = (out / f).read_bytes()
                total += len(data)
                meta["files"][f] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            _atomic_write_text(out / "stage.json", json.dumps(meta, indent=2, sort_keys=True))
            return {
                "files": [str(out / f) for f in ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "stage.json")],
                "bytes": total,
                "seconds": time.perf_counter() - start,
                "sha256": meta["files"]["weights.safetensors"]["sha256"],
            }

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.optimizer is not None
        names = {id(p): n for n, p in self.part.module.global_named_parameters()}
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state:
                    continue
                name = names[id(p)]
                for key, value in state.items():
                    if key == "step":
                        steps[name] = float(value)
                    elif torch.is_tensor(value):
                        tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        for g in groups:
            g["betas"] = list(g["betas"])
        return tensors, {"steps": steps, "param_groups": groups}

    def load(self, run_id: str, step: int, directory: str | os.PathLike[str], max_bytes: int) -> int:
        """Restore weights, optimizer and RNG from a shard written by `save` (no pickle anywhere)."""
        with self.lock:
            if self.running.is_set():
                raise StageError("precondition", "cannot load state while a step is running")
            src = Path(directory)
            meta_path = src / "stage.json"
            if not meta_path.is_file():
                raise StageError("precondition", f"no stage shard at {src} (missing stage.json)")
            meta = json.loads(_read_capped(meta_path, 16 << 20))
            if meta.get("model_fingerprint") != self.fingerprint():
                from redheart.config import diff_settings

                diffs = diff_settings(self.model_settings(), meta.get("model_settings", {}))
                raise StageError("precondition", f"checkpoint {src} was written by a different model: {'; '.join(diffs)}")
            if int(meta.get("step", -1)) != step:
                raise StageError("precondition", f"checkpoint {src} holds step {meta.get('step')}, not {step}")
            for f, info in meta.get("files", {}).items():
                data = _read_capped(src / f, max_bytes)
                if hashlib.sha256(data).hexdigest() != info["sha256"]:
                    raise StageError("precondition", f"checkpoint file {src / f} is corrupt (sha256 mismatch)")
            weights = load_file(str(src / "weights.safetensors"))
            params = dict(self.part.module.global_named_parameters())
            missing = sorted(set(params) - set(weights))
            unexpected = sorted(set(weights) - set(params))
            if missing or unexpected:
                raise StageError("precondition", f"checkpoint {src}: missing {missing[:5]} unexpected {unexpected[:5]}")
            with torch.no_grad():
                for name, p in params.items():
                    if weights[name].shape != p.shape:
                        raise StageError("precondition", f"checkpoint {src}: {name} has shape {tuple(weights[name].shape)}, the model has {tuple(p.shape)}")
                    p.copy_(weights[name].to(p.device, p.dtype))
            self.optimizer = build_optimizer(self.part.module, self.train)
            opt_tensors = load_file(str(src / "optimizer.safetensors"))
            opt_meta = meta["optimizer"]
            by_name = dict(self.part.module.global_named_parameters())
            for name, step_value in opt_meta["steps"].items():
                p = by_name[name]
                state = {"step": torch.tensor(step_value, dtype=torch.float32)}
                for key in ("exp_avg", "exp_avg_sq"):
                    t = opt_tensors.get(f"{name}::{key}")
                    if t is not None:
                        state[key] = t.to(p.device)
                self.optimizer.state[p] = state
            for group, saved in zip(self.optimizer.param_groups, opt_meta["param_groups"]):
                for k, v in saved.items():
                    group[k] = tuple(v) if k == "betas" else v
            rng = load_file(str(src / "rng.safetensors"))
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.part.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.part.device)
            self.run_id = run_id or meta["run_id"]
            self.next_step = step
            self.rounds_done = 0
            self.results.clear()
            self.applied.clear()
            self.mailbox.reset()
            self.current_plan = None
            return self.next_step


def _read_capped(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise StageError("precondition", f"{path} is {size} bytes, above the load cap of {max_bytes} (checkpoint.max_load_mb)")
    return path.read_bytes()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
