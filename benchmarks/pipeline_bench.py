"""Side-by-side throughput of the Red Heart pipeline against its peers, in one run.

    .venv/bin/python benchmarks/pipeline_bench.py                  # the issue's benchmark model
    .venv/bin/python benchmarks/pipeline_bench.py --steps 4 --quick  # a smoke run

Same model (default: hidden 512, 8 layers, 8 heads, sequence 128, batch 16, vocabulary 8192 —
29.5M parameters), same batch, same 8 micro-batches, measured one after the other on this machine:

  (a) single-process training with all cores (the whole batch at once);
  (b) torch.distributed.pipelining Schedule1F1B over gloo, 2 processes x (cores/2) threads, 40/60 split;
  (c) this project's gRPC pipeline, 2 stage processes x (cores/2) threads, the same 40/60 split;
  (d) this project's pipeline with the automatic split (measured per-layer times, see orchestrator/autosplit.py).

Prints samples/s of each and the ratios to (a) and (b), the measured bubble of (c)/(d) (time each
stage waited on its peer / its step time) next to the 1F1B bound 1/(m+1), wire bytes and
serialization seconds per step, and the error and size of every wire codec on a real activation.
Writes a JSON result and a PNG timeline of one step of (d).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    from orchestrator.stage_client import StageClient

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
            cpu.start_run(
                "bench",
                settings,
                next_address=gpu.address,
                prev_address="",
                regret_address="",
                first_step=0,
                reinitialize=True,
            )
            gpu.start_run(
                "bench",
                settings,
                next_address="",
                prev_address=cpu.address,
                regret_address="",
                first_step=0,
                reinitialize=True,
            )
            driver = PipelineDriver(cpu, gpu, cfg, "bench")
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


def _subprocess(variant: str, argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--variant", variant, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="raw", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["single", "torch", "ours", "codecs"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    parser.add_argument("--png", default=str(ROOT / "benchmarks" / "results" / "timeline.png"))
    args = parser.parse_args(argv)

    if args.variant == "single":
        print(json.dumps(run_single(args)))
        return 0
    if args.variant == "torch":
        print(json.dumps(run_torch_pp(args)))
        return 0
    if args.variant == "ours":
        print(json.dumps(run_ours(args, args.cpu_layers, args.codec)))
        return 0
    if args.variant == "codecs":
        print(json.dumps(codec_errors(args)))
        return 0

    common = [
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--heads={args.heads}",
        f"--seq={args.seq}",
        f"--batch={args.batch}",
        f"--vocab={args.vocab}",
        f"--micro-batches={args.micro_batches}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--cores={args.cores}",
    ]
    from orchestrator.autosplit import choose_split
    from redheart.model import count_parameters, resolve_model_shape

    cfg = model_config(args)
    shape = resolve_model_shape(cfg.model)
    fixed = round(args.layers * 0.4)
    print(
        f"model: {count_parameters(shape)['total'] / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"seq {args.seq}), batch {args.batch}, {args.micro_batches} micro-batches, {args.cores} cores",
        flush=True,
    )
    split = choose_split(
        cfg.replace(
            **{
                "cpu_stage.threads": max(1, args.cores // 2),
                "gpu_stage.threads": max(1, args.cores - args.cores // 2),
            }
        )
    )
    print(f"automatic split: {split.reason}", flush=True)
    results = {}
    for key, variant, extra in (
        ("single", "single", []),
        ("torch_1f1b", "torch", []),
        ("ours_fixed", "ours", [f"--cpu-layers={fixed}"]),
        ("ours_auto", "ours", [f"--cpu-layers={split.cpu_layers}"]),
        ("ours_fixed_bf16_wire", "ours", [f"--cpu-layers={fixed}", "--codec=bf16"]),
    ):
        print(f"running {key} ...", flush=True)
        results[key] = _subprocess(variant, common + extra)
        print(f"  {results[key]['step_seconds']:.3f} s/step", flush=True)
    codecs = _subprocess("codecs", common)
    sps = {k: args.batch / v["step_seconds"] for k, v in results.items()}
    bound = 1 / (args.micro_batches + 1)
    print()
    print(
        f"{'variant':<24}{'s/step':>9}{'samples/s':>11}{'vs single':>11}{'vs torch':>10}{'bubble':>9}{'wire/step':>11}"
    )
    for key, res in results.items():
        bubble = f"{res['bubble']:.1%}" if "bubble" in res else "-"
        wire = f"{res['wire_share']:.1%}" if "wire_share" in res else "-"
        print(
            f"{key:<24}{res['step_seconds']:>9.3f}{sps[key]:>11.2f}{sps[key] / sps['single']:>10.2f}x"
            f"{sps[key] / sps['torch_1f1b']:>9.2f}x{bubble:>9}{wire:>11}"
        )
    print(
        f"\n1F1B bubble bound for 2 balanced stages and {args.micro_batches} micro-batches: 1/(m+1) = {bound:.1%}"
    )
    for key in ("ours_fixed", "ours_auto"):
        r = results[key]
        print(
            f"{key}: split {r['cpu_layers']}/{args.layers - r['cpu_layers']}, bubble cpu {r['stages']['cpu stage']['bubble']:.1%} "
            f"gpu {r['stages']['gpu stage']['bubble']:.1%}, wire {r['wire_bytes_per_step'] / 1e6:.1f} MB/step, "
            f"serialization {r['serialize_seconds_per_step'] * 1e3:.1f} ms/step, wire time {r['wire_share']:.1%} of the step"
        )
    print("\nwire codecs on a real activation:")
    for name, c in codecs.items():
        print(
            f"  {name:<5} {c['bytes'] / 1e6:7.2f} MB  max |err| {c['max_abs_error']:.2e}  rel RMS err {c['rel_rms_error']:.2e}  "
            f"encode+decode {c['encode_decode_seconds'] * 1e3:.1f} ms"
        )
    summary = {
        "machine": {
            "platform": platform.platform(),
            "cores": args.cores,
            "python": platform.python_version(),
        },
        "model": {
            "parameters": count_parameters(shape)["total"],
            "hidden": args.hidden,
            "layers": args.layers,
            "seq": args.seq,
            "batch": args.batch,
            "micro_batches": args.micro_batches,
            "vocab": args.vocab,
        },
        "samples_per_second": sps,
        "ratios": {
            "ours_fixed_vs_torch": sps["ours_fixed"] / sps["torch_1f1b"],
            "ours_auto_vs_torch": sps["ours_auto"] / sps["torch_1f1b"],
            "ours_fixed_vs_single": sps["ours_fixed"] / sps["single"],
            "ours_auto_vs_single": sps["ours_auto"] / sps["single"],
        },
        "bubble_bound": bound,
        "automatic_split": {
            "cpu_layers": split.cpu_layers,
            "reason": split.reason,
            "candidates": split.candidates,
        },
        "results": results,
        "codecs": codecs,
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/pipeline_bench.py", *(argv or sys.argv[1:])]
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    draw_timeline(
        results["ours_auto"],
        Path(args.png),
        f"one step, automatic split {split.cpu_layers}/{args.layers - split.cpu_layers}, {args.micro_batches} micro-batches (1F1B)",
    )
    print(f"\nwrote {out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
