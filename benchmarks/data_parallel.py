"""Data-parallel overhead, measured side by side in one run: one replica of the pipeline against two.

    .venv/bin/python benchmarks/data_parallel.py                 # the benchmark model, 6 steps each
    .venv/bin/python benchmarks/data_parallel.py --steps 2 --quick

Same model and batch as benchmarks/pipeline_bench.py (hidden 512, 8 layers, sequence 128, batch 16,
8 micro-batches: 29.5M parameters), the production path (the local launcher, the services, the
driver, gloo), first with ``parallel.data_parallel = 1`` and then 2, each in a subprocess of its own.
Prints for each: the median step time and samples/s, and for two replicas the gradient sum's time
per step (the slowest stage process's), its share of the step and the bytes it moved; then the
samples/s ratio. On a machine with fewer cores than stage processes the replicas only share the
cores, so the speed-up cannot show there; the overhead can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

from pipeline_variants import ROOT, add_model_args, batch, model_argv, model_config


def measure(args) -> dict:
    from orchestrator.pipeline import PipelineDriver
    from orchestrator.service_set import ServiceSet

    cfg = model_config(args).replace(**{"parallel.data_parallel": args.replicas})
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        out = Path(tmp)
        (out / "config.toml").write_text(cfg.to_toml())
        services = ServiceSet(cfg, out, threading.Event())
        services.open(stack)
        services.handshake()
        services.start_run("bench", 0)
        driver = PipelineDriver([services.clients[s.name] for s in services.stages], cfg, "bench")
        stack.callback(driver.close)
        data = batch(args)
        outcomes = [driver.run_step(i, [data], 1e-4) for i in range(args.warmup + args.steps)][args.warmup :]
    step = statistics.median(o.seconds for o in outcomes)
    allreduce = statistics.median(max(t["allreduce"] for t in o.stage_timings.values()) for o in outcomes)
    moved = statistics.median(sum(t["allreduce_bytes"] for t in o.stage_timings.values()) for o in outcomes)
    return {
        "replicas": args.replicas,
        "step_seconds": step,
        "samples_per_second": args.batch / step,
        "allreduce_seconds_per_step": allreduce,
        "allreduce_share": allreduce / step,
        "allreduce_bytes_per_step": moved,
        "loss": outcomes[-1].total_loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="a small model (smoke run)")
    parser.add_argument("--replicas", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_parallel.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.seq, args.vocab = 128, 4, 4, 64, 2048
    if args.replicas:  # one measurement, in this process: its JSON is the last line
        print(json.dumps(measure(args)))
        return 0
    forwarded = model_argv(args)
    results = []
    for replicas in (1, 2):
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--replicas", str(replicas)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, two = results
    print(
        f"machine: {os.cpu_count()} cores; model hidden {args.hidden}, {args.layers} layers, batch {args.batch}"
    )
    for r in results:
        print(
            f"  {r['replicas']} replica(s): {r['step_seconds']:.3f} s/step, {r['samples_per_second']:.2f} samples/s, "
            f"gradient sum {r['allreduce_seconds_per_step']:.3f} s/step ({100 * r['allreduce_share']:.1f}% of the step, "
            f"{r['allreduce_bytes_per_step'] / 2**20:.1f} MiB)"
        )
    ratio = two["samples_per_second"] / one["samples_per_second"]
    print(f"samples/s, 2 replicas / 1: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
