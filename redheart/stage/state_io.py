"""A stage's state in and out of files: SaveState / LoadState through the checkpoint shard format
(redheart/stage/shards.py), and model.init_from weights at StartRun. A mixin of
:class:`redheart.stage.runtime.StageRuntime`: the state machine owns the lock and the step
counters, this module what is written and restored."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from redheart.config import TrainConfig
from redheart.stage.checks import short
from redheart.stage.contracts import StagePart
from redheart.stage.errors import ErrorKind, StageError
from redheart.stage.optimizer import build_optimizer
from redheart.stage.shards import (
    atomic_save_tensors,
    read_meta,
    read_optimizer_state,
    read_param_groups,
    read_rng,
    read_weights,
    write_stage_json,
)


class StateIO:
    """save / load of :class:`~redheart.stage.runtime.StageRuntime`, which sets these attributes and
    provides the lock (``_control``), the run check (``_check_run``), the model's description
    (``name``, ``fingerprint``, ``model_settings``) and the reset to a step (``_restart_at``)."""

    part: StagePart
    train: TrainConfig
    optimizer: torch.optim.Optimizer | None
    run_id: str
    next_step: int

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.part.module.global_named_parameters()]

    def save(self, run_id: str, step: int, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write this stage's shard: weights and optimizer tensors as safetensors, the rest as JSON."""
        with self._control(f"cannot save at step {step}"):
            self._check_run(run_id)
            if step != self.next_step:
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"SaveState for step {step}, but this stage has completed {self.next_step} steps",
                )
            start = time.perf_counter()
            try:
                return self._write_shard(run_id, step, Path(directory), start)
            except (OSError, ValueError, SafetensorError) as exc:
                # An unwritable, missing or malformed directory (or a full disk) is a problem of the
                # request or the machine, not a bug: FAILED_PRECONDITION naming the directory.
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"SaveState for step {step}: cannot write the shard to "
                    f"{short(directory)}: {type(exc).__name__}: {exc}",
                ) from None

    def _write_shard(self, run_id: str, step: int, out: Path, start: float) -> dict[str, Any]:
        """The body of `save` (holding the lock); I/O errors propagate to `save`."""
        out.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().to("cpu").contiguous() for n, p in self.named_parameters()}
        weights_path = out / "weights.safetensors"
        atomic_save_tensors(params, weights_path)
        opt_tensors, opt_meta = self._optimizer_state()
        atomic_save_tensors(opt_tensors, out / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.part.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.part.device)
        atomic_save_tensors(rng, out / "rng.safetensors")
        meta = {
            "stage": self.name,
            "run_id": run_id,
            "step": step,
            "model_fingerprint": self.fingerprint(),
            "model_settings": self.model_settings(),
            "optimizer": opt_meta,
            "files": {},
        }
        return write_stage_json(out, meta, start)

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
        """Restore weights, optimizer and RNG from a shard written by `save` (no pickle anywhere).

        The shard is an untrusted file: everything is read and checked first (sizes capped, sha256,
        names, shapes, types), and only then is the stage changed, so a refused load leaves it as it
        was. Anything unreadable or malformed is a FAILED_PRECONDITION naming the directory."""
        with self._control("cannot load state"):
            try:
                src = Path(directory)
                shard = self._read_shard(src, step, max_bytes)
            except StageError:
                raise
            except (
                OSError,
                ValueError,
                TypeError,
                KeyError,
                IndexError,
                AttributeError,
                RuntimeError,
                SafetensorError,
            ) as exc:
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"checkpoint {short(directory)} cannot be loaded: {type(exc).__name__}: {exc}",
                ) from None
            meta, weights, opt_state, groups, rng = shard
            params = dict(self.part.module.global_named_parameters())
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name].to(p.device, p.dtype))
            self.optimizer = build_optimizer(self.part.module, self.train)
            for name, state in opt_state.items():
                p = params[name]
                # The fused kernels read "step" on the parameter's device; the others want it on the CPU.
                fused = bool(self.optimizer.defaults.get("fused"))
                self.optimizer.state[p] = {
                    k: (v.to(p.device) if k != "step" or fused else v) for k, v in state.items()
                }
            for group, saved in zip(self.optimizer.param_groups, groups):
                group.update(saved)
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.part.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.part.device)
            self.run_id = run_id or meta.get("run_id") or self.run_id
            self._restart_at(step)
            return self.next_step

    def _read_shard(self, src: Path, step: int, max_bytes: int):
        """Read and check a shard without touching the stage; raises on anything malformed."""
        meta = read_meta(src, step, max_bytes, self.fingerprint(), self.model_settings())
        params = dict(self.part.module.global_named_parameters())
        weights = read_weights(src, params)
        opt_state = read_optimizer_state(src, meta.get("optimizer"), params)
        # Built only to read the types of its groups' values: the stage's optimizer is not touched.
        template = build_optimizer(self.part.module, self.train).param_groups
        groups = read_param_groups(src, meta["optimizer"]["param_groups"], template)
        rng = read_rng(src, self.part.device)
        return meta, weights, opt_state, groups, rng


def load_init_weights(part: StagePart, spec: Any) -> None:
    """model.init_from: this stage's parameters from an exported folder, by global name (any split)."""
    from redheart import model_folder

    try:
        tensors = model_folder.read_init_weights(spec, part.module)
    except (model_folder.ModelFolderError, OSError) as exc:
        raise StageError(ErrorKind.PRECONDITION, f"StartRun settings: init_from: {exc}") from None
    model_folder.load_into(part.module.global_named_parameters(), tensors)
