"""The user's size on this machine: the `base` preset (~200M parameters), both stages on CPU.

    .venv/bin/python benchmarks/base_preset.py [--steps 4] [--batch 8] [--out benchmarks/results/base_preset.json]

Runs a real local training run (CPU stage + GPU stage on CPU + regret service) of the base preset
at batch 8 through `redheart-orchestrate`, then reports the step time (median of the steps after
the first), peak RSS per process, and the projected wall time of the original workload: 3 epochs
of 28,882 scenarios at batch 8 (10,831 optimizer steps) at the measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_SCENARIOS = 28_882
ORIGINAL_EPOCHS = 3


# long: the command line (one --set per line) and the result record, written out in full
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "base_preset.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "base"
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--config",
            str(ROOT / "examples" / "hybrid.toml"),
            "--set",
            'model.preset="base"',
            "--set",
            f"train.batch_size={args.batch}",
            "--set",
            f"train.micro_batch_size={args.micro_batch}",
            "--set",
            f"train.max_steps={args.steps}",
            "--set",
            "train.log_every_n_steps=1",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "data.max_scenarios=600",
            "--set",
            "checkpoint.save_checkpoint_every=0",
            "--set",
            'orchestrator.progress="log"',
            "--set",
            "metrics.enabled=false",
            "--output-dir",
            str(out_dir),
        ]
        print("running:", " ".join(cmd[2:]), flush=True)
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        report = json.loads((out_dir / "report.json").read_text())
    steps = [h["step_seconds"] for h in report["loss_history"]]
    step_seconds = statistics.median(steps[1:] if len(steps) > 1 else steps)
    total_steps = ORIGINAL_EPOCHS * (ORIGINAL_SCENARIOS // args.batch)
    result = {
        "parameters": report["parameters"],
        "stages": report["stages"],
        "batch": args.batch,
        "micro_batches": args.batch // args.micro_batch,
        "step_seconds_each": steps,
        "step_seconds": step_seconds,
        "samples_per_second": args.batch / step_seconds,
        "peak_rss_bytes": report["peak_rss_bytes"],
        "projected_original_workload": {
            "epochs": ORIGINAL_EPOCHS,
            "scenarios": ORIGINAL_SCENARIOS,
            "steps": total_steps,
            "hours": total_steps * step_seconds / 3600,
        },
        "cpu_count": os.cpu_count(),
        "command": "benchmarks/base_preset.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"base preset: {report['parameters']['total'] / 1e6:.1f}M parameters "
        f"(cpu stage {report['parameters']['cpu_stage'] / 1e6:.1f}M, gpu stage {report['parameters']['gpu_stage'] / 1e6:.1f}M)"
    )
    print(
        f"step time at batch {args.batch}: {step_seconds:.1f} s (each: {', '.join(f'{s:.1f}' for s in steps)}), "
        f"{args.batch / step_seconds:.3f} samples/s"
    )
    print("peak RSS: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in report["peak_rss_bytes"].items()))
    p = result["projected_original_workload"]
    print(
        f"projected original workload ({p['epochs']} epochs x {p['scenarios']} scenarios at batch {args.batch} = "
        f"{p['steps']} steps): {p['hours']:.1f} h on this machine"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
