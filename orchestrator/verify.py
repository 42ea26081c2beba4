"""``redheart-orchestrate --config F --verify``: prove the live pipeline trains exactly like one process.

Runs ``orchestrator.verify_steps`` optimizer steps through the live stages (local or remote) and
the same steps in this process from the same initial weights and batches, then prints the largest
absolute difference of the losses and of every parameter. Exit code 0 within tolerance
(``verify_rtol`` / ``verify_atol``, default 1e-5 / 4e-5, torch's pipelining tests), 1 above it.
Run it after changing the split or moving a stage to another host.
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from orchestrator.data import StepBatches, prepare_data
from orchestrator.lr_schedule import learning_rate_at
from orchestrator.pipeline import PipelineDriver
from orchestrator.reference import SingleProcessTrainer, reference_placement
from orchestrator.run_dir import prepare_output
from orchestrator.trainer import HybridDistributedTrainer

CUDA_VERIFY_RTOL = 1e-4
CUDA_VERIFY_ATOL = 1e-4
"""Tolerance of --verify when the GPU stage runs on CUDA (fp32, TF32 off): the reference runs the
GPU part on the same device with the same dropout seeds, so only kernel order and atomics differ
(tests/integration/test_cuda.py checks it on a real card)."""


@dataclass
class VerifyResult:
    steps: int
    max_loss_diff: float
    max_param_diff: float
    worst_parameter: str
    parameters_compared: int
    ok: bool
    failures: list[str]


def verify(trainer: HybridDistributedTrainer, out=sys.stdout) -> VerifyResult:
    _fp32_only(trainer, out)
    with ExitStack() as stack:
        trainer.resolve_split()
        cfg = trainer.config
        prepare_output(cfg, trainer.output_dir, stack)
        data = prepare_data(cfg, trainer.output_dir)
        batches = StepBatches(cfg, data.train)
        services = trainer.open_services(stack)
        run_id = f"verify-{uuid.uuid4().hex[:8]}"
        regret = services.regret_address
        driver = PipelineDriver(
            [services.clients[s.name] for s in services.stages],
            cfg,
            run_id,
            lookahead=services.regret_lookahead(),
        )
        stack.callback(driver.close)
        services.restore(run_id, None)
        reference, o = _reference(cfg, services, out)
        steps = min(o.verify_steps, batches.total_steps)
        failures: list[str] = []
        pipeline = " + ".join(services.addresses[s.name] for s in services.stages)
        print(
            f"verifying {steps} step(s): pipeline at {pipeline} "
            f"(regret: {regret or 'off'}) against single-process training",
            file=out,
        )
        max_loss = _compare_steps(driver, reference, batches, steps, cfg, o, failures, out)
        ref = reference.named_parameters()
        live = services.parameters()
        worst, worst_name = _compare_parameters(live, ref, o, failures)
        if cfg.parallel.data_parallel > 1:
            differ = services.replica_differences(live)
            failures += [f"not the bits of replica 0: {d}" for d in differ[:10]]
            print(
                f"{cfg.parallel.data_parallel} replicas: "
                + (
                    f"{len(differ)} parameter(s) differ from replica 0's"
                    if differ
                    else "every parameter equals replica 0's bit for bit"
                ),
                file=out,
            )
        ok = not failures
        print(
            f"largest loss difference {max_loss:.3e}; largest parameter difference {worst:.3e}"
            f"{f' ({worst_name})' if worst_name else ''} over {len(ref)} tensors; "
            f"tolerance rtol {o.verify_rtol} atol {o.verify_atol}",
            file=out,
        )
        print(
            "VERIFY OK: the pipeline trains like a single process"
            if ok
            else "VERIFY FAILED:\n  " + "\n  ".join(failures[:20]),
            file=out,
        )
        return VerifyResult(steps, max_loss, worst, worst_name, len(ref), ok, failures)


def _fp32_only(trainer: HybridDistributedTrainer, out) -> None:
    """--verify compares fp32 math: mixed precision and TF32 are switched off for the check."""
    cfg = trainer.config
    if cfg.train.use_mixed_precision:
        print("note: --verify compares fp32 math; mixed precision is switched off for the check", file=out)
        cfg = cfg.replace(**{"train.use_mixed_precision": False})
        trainer.config = cfg
    if cfg.train.allow_tf32:
        # TF32 rounds matmul inputs to 10 mantissa bits on Ampere and later: not fp32 math.
        cfg = cfg.replace(**{"train.allow_tf32": False})
        trainer.config = cfg


def _reference(cfg, services, out):
    """The single-process trainer to compare with, and the tolerances (wider with CUDA)."""
    o = cfg.orchestrator
    # The reference runs the GPU part where the last stage runs it.
    gpu_device, note = reference_placement(
        services.stage_info[services.stages[-1].name].device, torch.cuda.is_available()
    )
    if note:
        print(f"note: {note}", file=out)
    reference = SingleProcessTrainer(cfg, gpu_device=gpu_device)
    if gpu_device.type == "cuda" and (o.verify_rtol < CUDA_VERIFY_RTOL or o.verify_atol < CUDA_VERIFY_ATOL):
        print(
            f"note: the GPU stage runs on {gpu_device}; CUDA's fp32 kernels reduce in another order than "
            f"the CPU's and some backward kernels use atomics, so the tolerance is widened to "
            f"rtol {CUDA_VERIFY_RTOL} atol {CUDA_VERIFY_ATOL}",
            file=out,
        )
        o = dataclasses.replace(
            o,
            verify_rtol=max(o.verify_rtol, CUDA_VERIFY_RTOL),
            verify_atol=max(o.verify_atol, CUDA_VERIFY_ATOL),
        )
    return reference, o


def _compare_steps(driver, reference, batches, steps: int, cfg, o, failures: list[str], out) -> float:
    """Run `steps` steps both ways; returns the largest micro-batch loss difference."""
    max_loss = 0.0
    for step in range(steps):
        lr = learning_rate_at(step, batches.total_steps, cfg.train)
        rounds = batches.rounds(step)
        got = driver.run_step(step, rounds, lr)
        want = reference.step(step, rounds, lr)
        a, b = (
            torch.tensor(got.micro_batch_losses, dtype=torch.float64),
            torch.tensor(want["micro_batch_losses"], dtype=torch.float64),
        )
        diff = float((a - b).abs().max())
        max_loss = max(max_loss, diff)
        try:
            torch.testing.assert_close(a, b, rtol=o.verify_rtol, atol=o.verify_atol)
            status = "ok"
        except AssertionError:
            status = "MISMATCH"
            failures.append(f"step {step}: micro-batch losses differ by up to {diff:.3e}")
        single = sum(want["micro_batch_losses"]) / len(want["micro_batch_losses"])
        print(
            f"  step {step}: loss pipeline {got.total_loss:.6f} single-process {single:.6f} "
            f"max |diff| {diff:.3e}  grad norm {got.grad_norm:.6f} vs {want['grad_norm']:.6f}  {status}",
            file=out,
        )
    return max_loss


def _compare_parameters(live: dict, ref: dict, o, failures: list[str]) -> tuple[float, str]:
    """Every parameter of the live stages against the reference's; returns the worst and its name."""
    missing = sorted(set(ref) ^ set(live))
    if missing:
        failures.append(f"parameter names differ: {missing[:5]}")
    worst, worst_name = 0.0, ""
    for name in sorted(set(ref) & set(live)):
        d = float((live[name] - ref[name]).abs().max()) if ref[name].numel() else 0.0
        if d > worst:
            worst, worst_name = d, name
        try:
            torch.testing.assert_close(live[name], ref[name], rtol=o.verify_rtol, atol=o.verify_atol)
        except AssertionError:
            failures.append(f"parameter {name} differs by up to {d:.3e}")
    return worst, worst_name
