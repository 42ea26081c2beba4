"""Automatic split (``model.gpu_layers_ratio = "auto"``): choose how many transformer layers go to
the CPU stage from *measured* speed on each stage's device, under the GPU memory budget.

Peers balance differently: torchgpipe by time on one device type, DeepSpeed by parameter count,
torch.distributed.pipelining not at all. A CPU and a GPU differ by an order of magnitude per
layer, and the CPU stage also carries the embeddings (a large matrix to update) while the GPU
stage carries the heads and losses, so neither "40/60" nor "equal layers" is balanced.

Model of one optimizer step for a split with ``k`` CPU layers (2 stages, m micro-batches, 1F1B):

    t_cpu(k) = embed + k x layer_cpu              forward + backward of one micro-batch
    t_gpu(k) = (L - k) x layer_gpu + heads
    step(k)  ≈ m x max(t_cpu, t_gpu) + min(t_cpu, t_gpu) + 2 x wire + max(opt_cpu(k), opt_gpu(k))

(the slower stage sets the pace; the other adds one micro-batch of fill/drain; both step their
optimizers at the same time). ``k`` is chosen to minimise step(k) among the splits whose GPU
stage memory estimate fits ``gpu_memory_gb``. Every measurement and the reason are logged and
returned, so a user can see why.

Each side is timed in the precision its stage will choose on its device (redheart/precision.py),
and a CUDA device is measured in a child process (``python -m orchestrator.autosplit``), so the
orchestrator never creates a CUDA context that would hold memory on the card for the whole run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from redheart import codec
from redheart.config import HybridConfig
from redheart.gpu_memory import stage_estimates
from redheart.heads import probe_labels
from redheart.losses import multitask_loss
from redheart.model import (
    CpuStageModule,
    EncoderLayer,
    GpuStageModule,
    ModelShape,
    count_parameters,
    resolve_model_shape,
)
from redheart.precision import Precision, apply_tf32, choose_precision, device_capability
from redheart.precision import autocast as precision_autocast

log = logging.getLogger(__name__)


@dataclass
class DeviceProfile:
    device: str
    threads: int
    layer_seconds: float  # forward + backward of one layer, one micro-batch
    fixed_seconds: float  # embeddings (cpu stage) or heads + loss (gpu stage)
    optimizer_seconds_per_param: float
    precision: str = "fp32"  # what the layers were timed in: the stage's own choice on that device


@dataclass
class SplitChoice:
    cpu_layers: int
    predicted_step_seconds: float
    candidates: dict[int, float] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    cpu: DeviceProfile | None = None
    gpu: DeviceProfile | None = None
    wire_seconds: float = 0.0
    reason: str = ""


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    """The fastest of `reps` timed calls after a warm-up (allocator, kernels, caches): on a shared
    host a neighbour's burst only ever makes a call slower, and a mean over a burst once measured
    one CPU-stage layer 1.6x slower than the same layer a second later (a 5/8 split for 7/6)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def profile_device(
    shape: ModelShape,
    device: torch.device,
    threads: int,
    micro_batch: int,
    seq: int,
    stage: str,
    reps: int = 3,
    precision: Precision | None = None,
    layer_seconds: float | None = None,
) -> DeviceProfile:
    """Measure one layer, the stage's fixed part and the optimizer cost on `device`, in `precision`
    (the autocast the stage will train under; fp32 when None). A given `layer_seconds` is used
    as the layer's time instead of measuring it again."""
    h = shape.hidden_size

    def autocast():
        return precision_autocast(precision, device.type)

    with _threads(threads), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        layer = EncoderLayer(h, shape.num_heads, shape.ffn_size, 0.0).to(device)
        x = torch.randn(micro_batch, seq, h, device=device, requires_grad=True)
        mask = torch.ones(micro_batch, seq, dtype=torch.bool, device=device)

        def layer_step():
            with autocast():
                y = layer(x, mask).float().sum()
            y.backward()

        if layer_seconds is None:
            layer_seconds = _time(layer_step, device, reps)
        tiny = ModelShape(
            h, 0, shape.num_heads, shape.ffn_size, shape.vocab_size, shape.max_seq_len, 0, 0.0, 0
        )
        if stage == "cpu":
            embed = CpuStageModule(tiny).to(device)
            ids = torch.randint(0, shape.vocab_size, (micro_batch, seq), device=device)

            def fixed():
                with autocast():
                    y = embed(ids, mask).float().sum()
                y.backward()

            fixed_seconds = _time(fixed, device, reps)
            opt_params = list(embed.parameters())
        else:
            heads = GpuStageModule(tiny).to(device)
            labels = probe_labels(micro_batch, device)

            def fixed():
                with autocast():
                    outputs = heads(x, mask)
                loss, _ = multitask_loss(outputs, labels, torch.zeros(micro_batch, device=device))
                loss.backward()

            fixed_seconds = _time(fixed, device, reps)
            opt_params = list(layer.parameters())
        for p in opt_params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(opt_params, lr=1e-4, fused=True)  # what the stages run
        n = sum(p.numel() for p in opt_params)
        per_param = _time(opt.step, device, reps) / max(n, 1)
    return DeviceProfile(
        str(device),
        threads,
        layer_seconds,
        fixed_seconds,
        per_param,
        precision.name if precision is not None else "fp32",
    )


def _precision(config: HybridConfig, device: torch.device) -> Precision:
    t = config.train
    return choose_precision(
        t.use_mixed_precision, t.mixed_precision_dtype, t.allow_tf32, device.type, device_capability(device)
    )


def profile_in_subprocess(
    config: HybridConfig,
    shape: ModelShape,
    device: str,
    threads: int,
    micro_batch: int,
    seq: int,
    stage: str,
    timeout: float = 600.0,
) -> DeviceProfile:
    """profile_device in a child process: a CUDA device is measured there, in the precision the
    stage will choose on it, so the orchestrator never holds a CUDA context (nor its cached blocks)."""
    t = config.train
    payload = {
        "shape": dataclasses.asdict(shape),
        "device": device,
        "threads": threads,
        "micro_batch": micro_batch,
        "seq": seq,
        "stage": stage,
        "mixed": t.use_mixed_precision,
        "dtype": t.mixed_precision_dtype,
        "allow_tf32": t.allow_tf32,
    }
    cmd = [sys.executable, "-m", "orchestrator.autosplit", json.dumps(payload)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"profiling the {stage} stage's layers on {device} took over {timeout:.0f}s"
        ) from None
    if out.returncode != 0:
        raise ValueError(
            f"profiling the {stage} stage's layers on {device} failed: {(out.stderr or out.stdout).strip()[-800:]}"
        )
    return DeviceProfile(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """Child process of profile_in_subprocess: one JSON DeviceProfile on stdout."""
    payload = json.loads((argv if argv is not None else sys.argv[1:])[0])
    device = torch.device(payload["device"])
    precision = choose_precision(
        payload["mixed"], payload["dtype"], payload["allow_tf32"], device.type, device_capability(device)
    )
    apply_tf32(precision, device)
    profile = profile_device(
        ModelShape(**payload["shape"]),
        device,
        payload["threads"],
        payload["micro_batch"],
        payload["seq"],
        payload["stage"],
        precision=precision,
    )
    print(json.dumps(dataclasses.asdict(profile)))
    return 0


def wire_seconds(
    shape: ModelShape, micro_batch: int, seq: int, codec_name: str, bandwidth_bytes_per_s: float = 1.0e9
) -> float:
    """Encode + decode + transfer of one activation and one gradient (measured codec, assumed link)."""
    t = torch.randn(micro_batch, seq, shape.hidden_size)
    start = time.perf_counter()
    for _ in range(3):
        msg = codec.encode(t, codec=codec_name)
        codec.decode(msg)
    serde = (time.perf_counter() - start) / 3
    return 2 * (serde + codec.encoded_nbytes(msg) / bandwidth_bytes_per_s)


def predict_step_seconds(
    shape: ModelShape, k: int, micro_batches: int, cpu: DeviceProfile, gpu: DeviceProfile, wire: float
) -> float:
    t_cpu = cpu.fixed_seconds + k * cpu.layer_seconds
    t_gpu = gpu.fixed_seconds + (shape.num_layers - k) * gpu.layer_seconds
    counts = count_parameters(ModelShape(**{**shape.__dict__, "cpu_layers": k}))
    opt = max(
        counts["cpu_stage"] * cpu.optimizer_seconds_per_param,
        counts["gpu_stage"] * gpu.optimizer_seconds_per_param,
    )
    return micro_batches * max(t_cpu, t_gpu) + min(t_cpu, t_gpu) + wire + opt


def _measure(
    config: HybridConfig,
    gpu_device: torch.device,
    shape: ModelShape,
    mb: int,
    seq: int,
    cpu_profile: DeviceProfile | None,
    gpu_profile: DeviceProfile | None,
) -> tuple[DeviceProfile, DeviceProfile, bool]:
    """Both stages' profiles (the given ones as they are), and whether one layer time serves both."""
    import os

    from orchestrator.launcher import stage_threads

    cores = os.cpu_count() or 1
    cpu_threads = config.cpu_stage.threads or stage_threads(config, cores)[0]
    gpu_threads = config.gpu_stage.threads or stage_threads(config, cores)[1]
    cpu = cpu_profile or profile_device(
        shape,
        torch.device("cpu"),
        cpu_threads,
        mb,
        seq,
        "cpu",
        precision=_precision(config, torch.device("cpu")),
    )
    if gpu_profile is not None:
        return cpu, gpu_profile, False
    if gpu_device.type == "cuda":
        return cpu, profile_in_subprocess(config, shape, str(gpu_device), gpu_threads, mb, seq, "gpu"), False
    gpu_precision = _precision(config, gpu_device)
    # Both stages on this CPU with the same threads and dtype run the same layer at the same
    # cost: a second measurement could only add a neighbour's noise to the split.
    same = gpu_threads == cpu.threads and gpu_precision.name == cpu.precision
    gpu = profile_device(
        shape,
        gpu_device,
        gpu_threads,
        mb,
        seq,
        "gpu",
        precision=gpu_precision,
        layer_seconds=cpu.layer_seconds if same else None,
    )
    return cpu, gpu, same


def choose_split(
    config: HybridConfig,
    *,
    cpu_profile: DeviceProfile | None = None,
    gpu_profile: DeviceProfile | None = None,
) -> SplitChoice:
    """Measure (unless profiles are given) and pick the number of CPU layers."""
    shape = resolve_model_shape(config.model)
    t = config.train
    # With length-aware batching a micro-batch is as wide as its longest text, not max_seq_len:
    # scenario texts are short (38 tokens on average in the bundled corpus), so profile at 64
    # positions. Per-layer times scale alike on both devices; the embedding update does not.
    seq = shape.max_seq_len if t.pad_to_multiple_of == 0 else min(shape.max_seq_len, 64)
    mb = t.micro_batch_size
    from gpu_stage.logic import resolve_device

    gpu_device = resolve_device(config.gpu_stage.device)
    cpu, gpu, same = _measure(config, gpu_device, shape, mb, seq, cpu_profile, gpu_profile)
    wire = wire_seconds(shape, mb, seq, config.wire.codec) * config.micro_batches
    choice = SplitChoice(
        cpu_layers=-1, predicted_step_seconds=float("inf"), cpu=cpu, gpu=gpu, wire_seconds=wire
    )
    budget = config.gpu_stage.gpu_memory_gb * 1024**3
    for k in range(0, shape.num_layers + 1):
        candidate = ModelShape(**{**shape.__dict__, "cpu_layers": k})
        # The estimate pre-flight and the stage itself enforce (checkpointing, autocast cache, CUDA context).
        need = stage_estimates(config, candidate, gpu_on_cuda=gpu_device.type == "cuda")["gpu"]["total"]
        if need > budget:
            choice.excluded[k] = (
                f"GPU stage needs ~{need / 1024**3:.2f} GiB > gpu_memory_gb {config.gpu_stage.gpu_memory_gb}"
            )
            continue
        seconds = predict_step_seconds(shape, k, config.micro_batches, cpu, gpu, wire)
        choice.candidates[k] = seconds
        if seconds < choice.predicted_step_seconds - 1e-12:
            choice.cpu_layers, choice.predicted_step_seconds = k, seconds
    if choice.cpu_layers < 0:
        raise ValueError(
            f"no split fits gpu_memory_gb = {config.gpu_stage.gpu_memory_gb}: even with every layer on the CPU stage "
            f"{choice.excluded[shape.num_layers]} (fix: raise gpu_memory_gb, lower micro_batch_size or use activation checkpointing)"
        )
    fixed = round(shape.num_layers * 0.4)
    fixed_seconds = choice.candidates.get(fixed)
    choice.reason = (
        f"one layer fwd+bwd: {cpu.layer_seconds * 1e3:.1f} ms on the CPU stage ({cpu.device}, {cpu.threads} threads, "
        f"{cpu.precision}) vs {gpu.layer_seconds * 1e3:.1f} ms on the GPU stage ({gpu.device}, {gpu.precision}"
        + (", the same layer on the same CPU: measured once" if same else "")
        + f"); embeddings {cpu.fixed_seconds * 1e3:.1f} ms, "
        f"heads+loss {gpu.fixed_seconds * 1e3:.1f} ms, wire {wire * 1e3:.1f} ms/step. "
        f"Chose {choice.cpu_layers} CPU layers / {shape.num_layers - choice.cpu_layers} GPU layers: predicted "
        f"{choice.predicted_step_seconds:.3f} s/step"
        + (
            f" vs {fixed_seconds:.3f} s/step for the fixed 40/60 split ({fixed} CPU layers)"
            if fixed_seconds
            else ""
        )
        + (f"; excluded by the GPU memory budget: {sorted(choice.excluded)}" if choice.excluded else "")
    )
    return choice


def resolve_auto_split(config: HybridConfig) -> tuple[HybridConfig, SplitChoice | None]:
    """Replace gpu_layers_ratio = "auto" by a measured model.cpu_layers (local launch only)."""
    m = config.model
    if m.gpu_layers_ratio != "auto" or m.cpu_layers is not None or m.stage_layers:
        return config, None  # a split given explicitly (model.stage_layers names every stage's layers)
    if config.launch.mode != "local":
        raise ValueError(
            'model.gpu_layers_ratio = "auto" measures both devices on this host before starting the stages, so it needs '
            'launch.mode = "local"; for remote stages run the automatic split once locally on the GPU host '
            "(redheart-orchestrate --config F --check prints it) and set model.cpu_layers on every service"
        )
    choice = choose_split(config)
    log.info("automatic split: %s", choice.reason)
    return config.replace(**{"model.cpu_layers": choice.cpu_layers}), choice


if __name__ == "__main__":
    sys.exit(main())
