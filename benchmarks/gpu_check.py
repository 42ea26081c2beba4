"""The device check: one command, within 10 minutes on one GPU, that shows whether the CUDA path works.

    python benchmarks/gpu_check.py                               # on the GPU host (base preset, CUDA)
    python benchmarks/gpu_check.py --device cpu --preset tiny    # dry run anywhere (CI), < 1 minute

It runs on an offline machine with a CUDA torch but maybe none of this project's other packages:
carry them as wheels with the working tree (docs/deploy.md, "Carrying the wheels to a GPU host")
and put them on PYTHONPATH. Sections (each with its own time limit; one failing does not stop the
others; `--skip NAME` leaves one out):

  env       python, torch, CUDA, cuDNN, the device and its memory, grpc / protobuf / ... versions
  pytest    `pytest -m cuda` (the CUDA tests; all skipped without a GPU)
  stage     the GPU stage in this process: forward / backward per micro-batch, host syncs per
            micro-batch (torch.cuda.set_sync_debug_mode), AdamW per-tensor / foreach / fused,
            peak memory against the estimate
  pipeline  the preset through the real pipeline (3 processes) in bf16 and in fp16: precision used,
            loss scale, wire bytes per element, per-stage times, peak GPU memory vs the budget
  verify    `redheart-orchestrate --verify` on the tiny preset with the GPU stage on the device:
            two stages, three (a middle stage on the device), two replicas (gloo on the card)
  single    the same workload (corpus, batches, padding, precision) all on the device in one
            process: the pipeline's yardstick (s/step ratio in the summary)

Prints a summary and writes it as JSON (--out, default benchmarks/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("env", "pytest", "stage", "pipeline", "verify", "single")
# Distribution name -> import name: what a run needs besides torch.
PACKAGES = {
    "grpcio": "grpc",
    "grpcio-health-checking": "grpc_health",
    "protobuf": "google.protobuf",
    "numpy": "numpy",
    "prometheus-client": "prometheus_client",
    "click": "click",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "psutil": "psutil",
    "matplotlib": "matplotlib",
    "pytest": "pytest",
    "nvidia-ml-py": "pynvml",
}
GiB = 1024**3


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "present (no metadata)" if importlib.util.find_spec(PACKAGES[dist]) else None


def section_env(args) -> dict:
    import torch

    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {d: _version(d) for d in PACKAGES},
    }
    try:
        out["commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["commit"] = None
    if args.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(args.device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        out.update(
            device=f"cuda:{index}",
            device_name=torch.cuda.get_device_name(index),
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
            cudnn=torch.backends.cudnn.version(),
            free_gib=free / GiB,
            total_gib=total / GiB,
            device_count=torch.cuda.device_count(),
        )
    missing = [d for d, v in out["packages"].items() if v is None and d not in ("nvidia-ml-py",)]
    out["missing"] = missing
    if missing:
        out["hint"] = (
            "carry them as wheels: docs/deploy.md, 'Carrying the wheels to a GPU host' "
            f"(missing: {', '.join(missing)})"
        )
    return out


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )


def cuda_test_files() -> list[str]:
    """The test modules with CUDA-marked tests: collecting only them needs no test-only packages
    (hypothesis, pyyaml, ...) on the GPU host."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.cuda" in p.read_text(encoding="utf-8")
    )


def section_pytest(args) -> dict:
    targets = cuda_test_files()
    proc = _run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs", *targets],
        timeout=args.pytest_timeout,
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "tail": lines[-25:]}


def _config(args, **overrides):
    from redheart.config import HybridConfig

    sections = {
        "model": {"preset": args.preset},
        "gpu_stage": {"device": args.device},
        "train": {
            "batch_size": args.batch,
            "micro_batch_size": args.micro_batch_size,
            "use_mixed_precision": True,
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return HybridConfig(**sections)


def section_stage(args) -> dict:
    from gpu_stage.inprocess import run_stage, time_adamw_variants

    out = {}
    for dtype in args.dtypes:
        cfg = _config(args, **{"train.mixed_precision_dtype": dtype})
        try:
            r = run_stage(cfg, steps=args.stage_steps, seq=args.seq, count_syncs=True)
        except Exception as exc:  # e.g. bf16 refused on a card below compute capability 8.0
            out[dtype] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        r.pop("losses")
        out[dtype] = r
    out["adamw_seconds"] = time_adamw_variants(_config(args))
    return out


def _workload_overrides(args, dtype: str, steps: int) -> list[str]:
    """The workload both the pipeline and the all-on-device run train: same corpus, batches, precision."""
    sets = {
        "model.preset": f'"{args.preset}"',
        "model.gpu_layers_ratio": '"auto"',
        "gpu_stage.device": f'"{args.device}"',
        "train.use_mixed_precision": "true",
        "train.mixed_precision_dtype": f'"{dtype}"',
        "train.batch_size": str(args.batch),
        "train.micro_batch_size": str(args.micro_batch_size),
        "train.max_steps": str(steps),
        "train.log_every_n_steps": "1",
        "train.warmup_steps": "0",
        "train.eval_every_epoch": "false",
        "data.max_scenarios": str(args.scenarios),
        "checkpoint.save_checkpoint_every": "0",
        "metrics.enabled": "false",
        "orchestrator.progress": '"log"',
        "regret.address": '"inprocess"' if args.dry_run else '""',
    }
    return [f"{key}={value}" for key, value in sets.items()]


def _orchestrate_cmd(out_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    """`redheart-orchestrate` on the bundled config into ``out_dir``, with ``--set`` each override."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "--config", str(ROOT / "examples" / "hybrid.toml")]
    cmd += ["--output-dir", str(out_dir), *extra]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _pipeline_cmd(args, out_dir: Path, dtype: str, extra: list[str]) -> list[str]:
    return _orchestrate_cmd(out_dir, _workload_overrides(args, dtype, args.pipeline_steps)) + extra


def _tokenizer_args(args) -> list[str]:
    """Reuse the first run's tokenizer: training it again costs seconds per run and changes nothing."""
    path = Path(args.workdir) / "tokenizer.json"
    return ["--set", f'data.tokenizer_path="{path}"'] if path.exists() else []


def section_pipeline(args) -> dict:
    out = {}
    for dtype in args.dtypes:
        run_dir = Path(args.workdir) / f"pipeline-{dtype}"
        start = time.perf_counter()
        proc = _run(_pipeline_cmd(args, run_dir, dtype, _tokenizer_args(args)), timeout=args.pipeline_timeout)
        if proc.returncode != 0:
            out[dtype] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            continue
        report = json.loads((run_dir / "report.json").read_text())
        if (run_dir / "tokenizer.json").exists() and not (Path(args.workdir) / "tokenizer.json").exists():
            (Path(args.workdir) / "tokenizer.json").write_bytes((run_dir / "tokenizer.json").read_bytes())
        history = report["loss_history"]
        steady = [h["step_seconds"] for h in history][1:] or [h["step_seconds"] for h in history]
        out[dtype] = {
            "wall_seconds": time.perf_counter() - start,
            "step_seconds": statistics.median(steady),
            "precision": report.get("precision"),
            "loss_scale": [h.get("loss_scale") for h in history],
            "skipped_steps": report["skipped_steps"],
            "split": report["split"],
            "bubble": history[-1].get("bubble"),
            "peak_gpu_memory_bytes": report["peak_gpu_memory_bytes"],
            "budget_bytes": report["config"]["gpu_stage"]["gpu_memory_gb"] * GiB,
            "stages": report["stages"],
            "final_loss": history[-1]["loss"],
        }
    return out


VERIFY_VARIANTS = {
    "two stages": [],
    "three stages": ["--set", "model.stage_layers=[1, 1, 2]"],  # a middle stage on the device
    "two replicas": ["--set", "parallel.data_parallel=2"],  # gloo on CUDA tensors (one GPU: no NCCL)
}


def section_verify(args) -> dict:
    """`--verify` of the tiny preset with the GPU stages on the device: two stages, three (a middle
    stage on the device too), two data-parallel replicas (gloo on CUDA tensors: one card)."""
    variants = {}
    for name, extra in VERIFY_VARIANTS.items():
        overrides = [
            'model.preset="tiny"',
            f'gpu_stage.device="{args.device}"',
            f"orchestrator.verify_steps={1 if args.dry_run else 2}",
            f"data.max_scenarios={args.scenarios}",
            "metrics.enabled=false",
        ]
        out_dir = Path(args.workdir) / "verify" / name.replace(" ", "-")
        cmd = _orchestrate_cmd(out_dir, overrides, "--verify") + _tokenizer_args(args) + extra
        if args.dry_run:
            cmd += ["--set", 'regret.address="inprocess"']
        proc = _run(cmd, timeout=args.verify_timeout)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        tail = lines[-6:] or proc.stderr[-1500:].splitlines()
        variants[name] = {"returncode": proc.returncode, "ok": proc.returncode == 0, "tail": tail}
    first = variants["two stages"]
    return {**first, "ok": all(v["ok"] for v in variants.values()), "variants": variants}


def section_single(args) -> dict:
    """The same workload all on one device in one process: the pipeline's micro-batches (same corpus,
    tokenizer, padding, accumulation) in order, autocast in the stage's precision, the regret
    calculus as target, fused AdamW. What the hybrid pipeline is measured against."""
    import torch

    from gpu_stage.logic import resolve_device
    from orchestrator.batching import step_micro_batches
    from orchestrator.data import StepBatches, prepare_data
    from redheart import calculus
    from redheart.config import load_config
    from redheart.heads import label_keys
    from redheart.losses import multitask_loss
    from redheart.model import CpuStageModule, GpuStageModule, resolve_model_shape
    from redheart.precision import choose_precision, device_capability

    device = resolve_device(args.device)
    out = {}
    for dtype in args.dtypes:
        overrides = _workload_overrides(args, dtype, args.single_steps + 1) + _tokenizer_args(args)[1::2]
        cfg = load_config(
            ROOT / "examples" / "hybrid.toml",
            env={},
            overrides=overrides,
            output_dir=str(Path(args.workdir) / f"single-{dtype}"),
        )
        try:
            p = choose_precision(True, dtype, True, device.type, device_capability(device))
        except ValueError as exc:
            out[dtype] = {"error": str(exc)}
            continue
        t = cfg.train
        data = prepare_data(cfg, Path(args.workdir) / f"single-{dtype}")
        batches = StepBatches(cfg, data.train)
        shape = resolve_model_shape(cfg.model)
        cpu, gpu = CpuStageModule(shape).to(device), GpuStageModule(shape).to(device)
        params = list(cpu.parameters()) + list(gpu.parameters())
        opt = torch.optim.AdamW(params, lr=t.learning_rate, fused=True)
        scaler = torch.amp.GradScaler(device.type, enabled=p.loss_scaling)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(args.single_steps + 1):
            parts = step_micro_batches(batches.rounds(step), t.micro_batch_size, t.pad_to_multiple_of)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for part in parts:
                mask = part.tensors["attention_mask"].to(device, non_blocking=True)
                ids = part.tensors["input_ids"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=p.autocast_dtype):
                    outputs = gpu(cpu(ids, mask), mask)
                target = calculus.score_tensor(
                    outputs["bentham"], cfg.regret.regrets_per_step, cfg.regret.bentham_per_regret
                )
                labels = {k: part.tensors[k].to(device, non_blocking=True) for k in label_keys()}
                loss, _ = multitask_loss(outputs, labels, target, t.loss_weights, lazy=True)
                scaler.scale(loss / len(parts)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        out[dtype] = {
            "precision": p.name,
            "step_seconds": statistics.median(times),
            "micro_batches": len(parts),
            "peak_gpu_memory_bytes": peak,
        }
        del cpu, gpu, opt
    return out


def summarize(results: dict) -> list[str]:
    lines = []
    env = results.get("env", {})
    if "torch" in env:
        lines.append(
            f"torch {env['torch']} (CUDA {env['torch_cuda']}), python {env['python']}, {env['cpu_cores']} cores, "
            f"device {env.get('device_name', 'cpu')} cc {env.get('compute_capability', '-')} "
            f"{env.get('total_gib', 0):.1f} GiB; grpc {env['packages'].get('grpcio')}, "
            f"protobuf {env['packages'].get('protobuf')}"
        )
        if env.get("missing"):
            lines.append(f"MISSING packages: {', '.join(env['missing'])} -- {env['hint']}")
    if "pytest" in results:
        lines.append(f"pytest -m cuda: {results['pytest'].get('summary', results['pytest'])}")
    for dtype, r in results.get("stage", {}).items():
        if dtype == "adamw_seconds":
            lines.append(
                "AdamW step over the GPU stage: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r.items())
            )
        elif "error" in r:
            lines.append(f"stage in process ({dtype}): {r['error'][:300]}")
        else:
            fwd, bwd = r["forward_seconds_per_micro_batch"] * 1e3, r["backward_seconds_per_micro_batch"] * 1e3
            lines.append(
                f"stage in process ({dtype} -> {r['precision']}): {r['step_seconds'] * 1e3:.1f} ms/step, "
                f"fwd {fwd:.2f} / bwd {bwd:.2f} ms per micro-batch (host), syncs/micro-batch "
                f"{r['host_syncs_per_micro_batch']}, peak {r['peak_memory_bytes'] / GiB:.3f} GiB vs estimate "
                f"{r['estimate_bytes'] / GiB:.3f} GiB, gradient {r['gradient_dtype']}"
            )
    single = results.get("single", {})
    for dtype, r in results.get("pipeline", {}).items():
        if "error" in r:
            lines.append(f"pipeline ({dtype}): FAILED {r['error'][-300:]}")
            continue
        s = single.get(dtype, {})
        # The goal: the pipeline at >= 0.75x the speed of the same model all on the GPU.
        ratio = (
            (
                f", {s['step_seconds'] / r['step_seconds']:.2f}x the speed of all-on-device "
                f"({s['step_seconds']:.3f} s/step)"
            )
            if s.get("step_seconds")
            else ""
        )
        used = {k: v.get("used") for k, v in (r["precision"] or {}).items()}
        scales = r["loss_scale"]
        lines.append(
            f"pipeline ({dtype}): {r['step_seconds']:.3f} s/step{ratio}; precision {used}; loss scale "
            f"{scales[:1]}->{scales[-1:]} ({r['skipped_steps']} skipped); split {r['split']['cpu_layers']} "
            f"CPU layers; peak GPU {r['peak_gpu_memory_bytes'] / GiB:.2f} of "
            f"{r['budget_bytes'] / GiB:.1f} GiB budget"
        )
    if "verify" in results:
        v = results["verify"]
        for name, one in (v.get("variants") or {"two stages": v}).items():
            lines.append(
                f"verify tiny, {name}: {'OK' if one.get('ok') else 'FAILED'}: {(one.get('tail') or [''])[-2:]}"
            )
    for name, err in results.get("errors", {}).items():
        lines.append(f"section {name} FAILED: {err.splitlines()[-1] if err else ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=0, help="0: the project's automatic choice")
    parser.add_argument(
        "--seq", type=int, default=0, help="sequence length of the in-process runs (0: the preset's)"
    )
    parser.add_argument(
        "--dtypes", default="bf16,fp16", help="mixed_precision_dtype values to run (comma-separated)"
    )
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the example config's relative paths (the bundled corpus) are the pipeline runs' too
    args.dry_run = args.device == "cpu"
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.dry_run:
        # On CPU every dtype trains in bf16 (redheart/precision.py): one run says it all.
        args.dtypes = args.dtypes[:1]
    small = args.dry_run
    args.stage_steps, args.pipeline_steps, args.single_steps = (1, 1, 1) if small else (10, 12, 10)
    args.scenarios = 200 if small else 2000
    args.pytest_timeout, args.pipeline_timeout, args.verify_timeout = (
        (60, 60, 60) if small else (240, 120, 90)
    )
    if small and not args.seq:
        args.seq = 32
    results: dict = {"args": {k: v for k, v in vars(args).items()}, "errors": {}}
    started = time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="gpu-check-")
    args.workdir = workdir.name
    for name in SECTIONS:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results[name] = globals()[f"section_{name}"](args)
        except Exception:
            results["errors"][name] = traceback.format_exc()[-3000:]
        results.setdefault("seconds", {})[name] = time.perf_counter() - t0
    workdir.cleanup()
    results["total_seconds"] = time.perf_counter() - started
    print("\n".join(summarize(results)))
    print(f"total {results['total_seconds']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
