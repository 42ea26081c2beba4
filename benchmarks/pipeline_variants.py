"""The measured variants of benchmarks/pipeline_bench.py, each run in a subprocess of its own.

(a) single-process training, (b) torch.distributed.pipelining Schedule1F1B over gloo, (c, d) this
project's gRPC pipeline with a given split, and the wire codecs' error on a real activation; plus the
timeline drawing. The script (pipeline_bench.py) parses the arguments, runs each and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MODEL_ARGS = (
    ("hidden", 512),
    ("layers", 8),
    ("heads", 8),
    ("seq", 128),
    ("batch", 16),
    ("vocab", 8192),
    ("micro_batches", 8),
    ("steps", 6),
    ("warmup", 2),
)
"""The benchmark model and run length (29.5M parameters, 8 micro-batches of 2), as flags with defaults."""


def add_model_args(parser) -> None:
    """``--hidden`` ... ``--warmup``: the benchmark model and how many steps to measure."""
    for name, default in MODEL_ARGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)


def model_argv(args) -> list[str]:
    """The flags of :func:`add_model_args` as ``args`` holds them (for a measuring subprocess)."""
    return [x for name, _ in MODEL_ARGS for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def model_config(args, cpu_layers: int | None = None, codec: str = "raw"):
    from redheart.config import HybridConfig

    return HybridConfig(
        model={
            "preset": "custom",
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "ffn_size": 4 * args.hidden,
            "vocab_size": args.vocab,
            "max_seq_len": args.seq,
            **({"cpu_layers": cpu_layers} if cpu_layers is not None else {}),
        },
        train={
            "batch_size": args.batch,
            "micro_batch_size": args.batch // args.micro_batches,
            "max_grad_norm": 1.0,
            "learning_rate": 1e-4,
        },
        regret={"enabled": False},
        wire={"codec": codec},
        metrics={"enabled": False},
        launch={"ports": "auto"},
        orchestrator={"step_deadline_seconds": 600},
    )


def batch(args, seed: int = 0):
    import torch

    from orchestrator.pipeline import Batch

    g = torch.Generator().manual_seed(seed)
    b, t = args.batch, args.seq
    tensors = {
        "input_ids": torch.randint(4, args.vocab, (b, t), generator=g),
        "attention_mask": torch.ones(
            b, t, dtype=torch.long
        ),  # full length: torch pipelining passes one tensor
        "labels.emotions": (torch.rand(b, 6, generator=g) > 0.5).float(),
        "labels.emotions_mask": torch.ones(b, dtype=torch.bool),
        "labels.bentham": torch.rand(b, 8, generator=g),
        "labels.bentham_mask": torch.ones(b, dtype=torch.bool),
        "labels.judgment": torch.randint(0, 5, (b,), generator=g),
    }
    return Batch(tensors, [f"b{i}" for i in range(b)])


# ----------------------------------------------------------------------------- (a) single process


def run_single(args) -> dict:
    import torch

    from redheart.heads import label_keys
    from redheart.losses import multitask_loss
    from redheart.model import CpuStageModule, GpuStageModule, resolve_model_shape
    from redheart.stage.optimizer import build_optimizer

    torch.set_num_threads(args.cores)
    cfg = model_config(args)
    shape = resolve_model_shape(cfg.model)
    cpu, gpu = CpuStageModule(shape), GpuStageModule(shape)
    opts = [build_optimizer(cpu, cfg.train), build_optimizer(gpu, cfg.train)]
    data = batch(args)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        ids, mask = data.tensors["input_ids"], data.tensors["attention_mask"]
        out = gpu(cpu(ids, mask), mask)
        loss, _ = multitask_loss(out, {k: data.tensors[k] for k in label_keys()}, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(cpu.parameters()) + list(gpu.parameters()), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(times), "all": times, "threads": args.cores}


# ----------------------------------------------------------------------------- (b) torch pipelining


# long: one spawned process of torch's pipelining (modules, loss, schedule and step loop together),
# so the measured peer is readable in one place.
def _torch_pp_worker(rank: int, args, port: int, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from redheart.losses import multitask_loss
    from redheart.model import CpuStageModule, GpuStageModule, resolve_model_shape
    from redheart.stage.optimizer import build_optimizer

    torch.set_num_threads(max(1, args.cores // 2))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = model_config(args, cpu_layers=round(args.layers * 0.4))
    shape = resolve_model_shape(cfg.model)
    mb = args.batch // args.micro_batches

    class First(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = CpuStageModule(shape)

        def forward(self, ids):
            return self.inner(ids, torch.ones_like(ids))

    class Last(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = GpuStageModule(shape)

        def forward(self, hidden):
            mask = torch.ones(hidden.shape[:2], dtype=torch.long)
            out = self.inner(hidden, mask)
            # one tensor for the schedule: [B, 6 + 8 + 5 + 1]
            return torch.cat(
                [out["emotion_logits"], out["bentham"], out["judgment_logits"], out["regret"][:, None]], 1
            )

    def loss_fn(output, target):
        out = {
            "emotion_logits": output[:, :6],
            "bentham": output[:, 6:14],
            "judgment_logits": output[:, 14:19],
            "regret": output[:, 19],
        }
        labels = {
            "labels.emotions": target[:, :6],
            "labels.emotions_mask": target[:, 6] > 0.5,
            "labels.bentham": target[:, 7:15],
            "labels.bentham_mask": target[:, 15] > 0.5,
            "labels.judgment": target[:, 16].long(),
        }
        loss, _ = multitask_loss(out, labels, None)
        return loss

    module = First() if rank == 0 else Last()
    example = (
        torch.zeros(mb, args.seq, dtype=torch.long) if rank == 0 else torch.zeros(mb, args.seq, args.hidden)
    )
    stage = PipelineStage(module, rank, 2, torch.device("cpu"), input_args=(example,))
    schedule = Schedule1F1B(stage, args.micro_batches, loss_fn=loss_fn)
    opt = build_optimizer(module, cfg.train)
    data = batch(args)
    t = data.tensors
    target = torch.cat(
        [
            t["labels.emotions"],
            t["labels.emotions_mask"].float()[:, None],
            t["labels.bentham"],
            t["labels.bentham_mask"].float()[:, None],
            t["labels.judgment"].float()[:, None],
        ],
        1,
    )
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            schedule.step(t["input_ids"])
        else:
            schedule.step(target=target, losses=[])
        norm_sq = torch.tensor(
            [sum(float(p.grad.pow(2).sum()) for p in module.parameters() if p.grad is not None)]
        )
        dist.all_reduce(norm_sq)  # global clipping, as ours does
        coef = min(1.0, 1.0 / (float(norm_sq.sqrt()) + 1e-6))
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(result_path).write_text(
            json.dumps(
                {
                    "step_seconds": statistics.median(times),
                    "all": times,
                    "threads_per_process": max(1, args.cores // 2),
                }
            )
        )
    dist.destroy_process_group()


def run_torch_pp(args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    mp.spawn(_torch_pp_worker, args=(args, port, path), nprocs=2, join=True)
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- (c, d) ours


def run_ours(args, cpu_layers: int, codec: str = "raw") -> dict:
    import torch

    from orchestrator.launcher import LocalLauncher
    from orchestrator.pipeline import PipelineDriver
    from orchestrator.stage_client import StageClient, start_stages

    torch.set_num_threads(1)
    cfg = model_config(args, cpu_layers=cpu_layers, codec=codec)
    cfg = cfg.replace(
        **{
            "cpu_stage.threads": max(1, args.cores // 2),
            "gpu_stage.threads": max(1, args.cores - args.cores // 2),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "bench.toml"
        resolved.write_text(cfg.to_toml())
        launcher = LocalLauncher(cfg, resolved, Path(tmp) / "logs")
        launcher.start(["cpu_stage", "gpu_stage"])
        clients = {
            n: StageClient(
                n.replace("_", " "), launcher.services[n].address, max_message_mb=512, rpc_timeout=120
            )
            for n in ("cpu_stage", "gpu_stage")
        }
        try:
            settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
            cpu, gpu = clients["cpu_stage"], clients["gpu_stage"]
            start_stages([cpu, gpu], "bench", settings, regret_address="")
            driver = PipelineDriver((cpu, gpu), cfg, "bench")
            data = batch(args)
            outcomes = []
            for i in range(args.warmup + args.steps):
                out = driver.run_step(i, [data], 1e-4)
                if i >= args.warmup:
                    outcomes.append(out)
            driver.close()
        finally:
            for c in clients.values():
                c.close()
            launcher.stop_all()
    return _summarize_ours(outcomes, cpu_layers, codec)


def _summarize_ours(outcomes: list, cpu_layers: int, codec: str) -> dict:
    """Medians over the measured steps: step time, per-stage bubble / compute / wire, one timeline."""
    step = statistics.median(o.seconds for o in outcomes)
    per_stage = {}
    for name in ("cpu stage", "gpu stage"):
        timings = [o.stage_timings[name] for o in outcomes]
        per_stage[name] = {
            "bubble": statistics.median(t["wait"] / t["total"] for t in timings),
            "compute_seconds": statistics.median(t["forward"] + t["backward"] - t["wait"] for t in timings),
            "serialize_seconds": statistics.median(t["serialize"] for t in timings),
            "send_seconds": statistics.median(t["send"] for t in timings),
            "bytes_sent": statistics.median(t["bytes_sent"] for t in timings),
        }
    best = min(outcomes, key=lambda o: o.seconds)
    wire = sum(per_stage[s]["serialize_seconds"] + per_stage[s]["send_seconds"] for s in per_stage)
    return {
        "step_seconds": step,
        "all": [o.seconds for o in outcomes],
        "cpu_layers": cpu_layers,
        "codec": codec,
        "stages": per_stage,
        "bubble": max(v["bubble"] for v in per_stage.values()),
        "wire_bytes_per_step": sum(v["bytes_sent"] for v in per_stage.values()),
        "serialize_seconds_per_step": sum(v["serialize_seconds"] for v in per_stage.values()),
        "wire_seconds_per_step": wire,
        "wire_share": wire / step,
        "timeline": {k: v for k, v in best.spans.items()},
        "loss": outcomes[-1].total_loss,
    }


def codec_errors(args) -> dict:
    import torch

    from redheart import codec
    from redheart.model import CpuStageModule, resolve_model_shape

    cfg = model_config(args)
    shape = resolve_model_shape(cfg.model)
    data = batch(args)
    mb = args.batch // args.micro_batches
    with torch.no_grad():
        act = CpuStageModule(shape)(data.tensors["input_ids"][:mb], data.tensors["attention_mask"][:mb])
    out = {}
    for name in ("raw", "bf16", "fp16", "int8"):
        start = time.perf_counter()
        msg = codec.encode(act, codec=name)
        back = codec.decode(msg)
        seconds = time.perf_counter() - start
        err = (back - act).abs()
        out[name] = {
            "bytes": codec.encoded_nbytes(msg),
            "max_abs_error": float(err.max()),
            "rel_rms_error": float(err.pow(2).mean().sqrt() / act.pow(2).mean().sqrt()),
            "encode_decode_seconds": seconds,
        }
    return out


def draw_timeline(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"F": "#4C72B0", "B": "#DD8452", "wait": "#CCCCCC"}
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for row, name in enumerate(("gpu stage", "cpu stage")):
        spans = result["timeline"].get(name, [])
        # compute spans first, then the waits on top: a backward's span includes waiting for its gradient
        for action, mb, start, end in sorted(spans, key=lambda s: s[0] == "wait"):
            ax.barh(
                row,
                end - start,
                left=start,
                color=colors.get(action, "#999999"),
                edgecolor="white",
                height=0.7,
                hatch="//" if action == "wait" else None,
            )
            if action in ("F", "B") and end - start > 0.01 * result["step_seconds"]:
                ax.text(
                    (start + end) / 2,
                    row,
                    f"{action}{mb}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks([0, 1], ["GPU stage", "CPU stage"])
    ax.set_xlabel("seconds since the round started")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(
        handles,
        ["forward", "backward", "waiting on peer"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35),
        ncol=3,
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
