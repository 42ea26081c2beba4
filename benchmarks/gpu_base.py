"""GPU figures for the user's size: run on a machine with an NVIDIA GPU.

    .venv/bin/python benchmarks/gpu_base.py                     # base preset, batch 8, CUDA
    .venv/bin/python benchmarks/gpu_base.py --device cpu --preset tiny --steps 3   # dry run anywhere

Side by side in one run:
  1. the hybrid pipeline: CPU stage on the host's cores, GPU stage on CUDA, automatic split,
     fp16 mixed precision, batch 8 — step time, samples/s, peak GPU memory (from the run's report);
  2. the same model trained all-on-GPU in one process (fp16 autocast + GradScaler), same batch —
     step time, samples/s, peak GPU memory.
Prints both and writes benchmarks/results/gpu_base.json (name the machine in RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hybrid(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "orchestrator.cli", "--config", str(ROOT / "examples" / "hybrid.toml"),
               "--set", f'model.preset="{args.preset}"', "--set", 'model.gpu_layers_ratio="auto"',
               "--set", f'gpu_stage.device="{args.device}"', "--set", f"train.use_mixed_precision={str(args.amp).lower()}",
               "--set", f"train.batch_size={args.batch}", "--set", f"train.micro_batch_size={args.batch // 2}",
               "--set", f"train.max_steps={args.steps}", "--set", "train.log_every_n_steps=1", "--set", "train.warmup_steps=0",
               "--set", "data.max_scenarios=600", "--set", "checkpoint.save_checkpoint_every=0",
               "--set", "metrics.enabled=false", "--set", 'orchestrator.progress="log"', "--output-dir", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-4000:])
        report = json.loads((out / "report.json").read_text())
    steps = [h["step_seconds"] for h in report["loss_history"]][1:] or [h["step_seconds"] for h in report["loss_history"]]
    step = statistics.median(steps)
    return {"step_seconds": step, "samples_per_second": args.batch / step, "peak_gpu_memory_bytes": report["peak_gpu_memory_bytes"],
            "split": report["split"], "parameters": report["parameters"], "peak_rss_bytes": report["peak_rss_bytes"]}


def single(args) -> dict:
    import torch

    from orchestrator.pipeline import LABEL_KEYS
    from redheart.config import ModelConfig
    from redheart.losses import multitask_loss
    from redheart.model import CpuStageModule, GpuStageModule, resolve_model_shape

    device = torch.device(args.device)
    shape = resolve_model_shape(ModelConfig(preset=args.preset))
    cpu, gpu = CpuStageModule(shape).to(device), GpuStageModule(shape).to(device)
    params = list(cpu.parameters()) + list(gpu.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    b, t = args.batch, shape.max_seq_len
    ids = torch.randint(4, shape.vocab_size, (b, t), device=device)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    labels = {"labels.emotions": torch.zeros(b, 6, device=device), "labels.emotions_mask": torch.ones(b, dtype=torch.bool, device=device),
              "labels.bentham": torch.rand(b, 8, device=device), "labels.bentham_mask": torch.ones(b, dtype=torch.bool, device=device),
              "labels.judgment": torch.zeros(b, dtype=torch.long, device=device)}
    assert set(labels) == set(LABEL_KEYS)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = gpu(cpu(ids, mask), mask)
        loss, _ = multitask_loss(out, labels, None)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"step_seconds": step, "samples_per_second": b / step, "peak_gpu_memory_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_base.json"))
    args = parser.parse_args(argv)
    import torch

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    h = hybrid(args)
    s = single(args)
    print(f"machine: {machine}, {os.cpu_count()} CPU cores; preset {args.preset}, batch {args.batch}, amp {args.amp}")
    print(f"hybrid (CPU stage + GPU stage on {args.device}, split {h['split']['cpu_layers']} CPU layers): "
          f"{h['step_seconds']:.3f} s/step, {h['samples_per_second']:.2f} samples/s, peak GPU {h['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    print(f"single process all on {args.device}: {s['step_seconds']:.3f} s/step, {s['samples_per_second']:.2f} samples/s, "
          f"peak GPU {s['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    result = {"machine": machine, "cpu_cores": os.cpu_count(), "preset": args.preset, "batch": args.batch,
              "amp": args.amp, "hybrid": h, "single_process_all_on_device": s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
