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

The variants themselves are in benchmarks/pipeline_variants.py; this script runs each in a
subprocess of its own (``--variant``) and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from pipeline_variants import (
    ROOT,
    add_model_args,
    codec_errors,
    draw_timeline,
    model_config,
    run_ours,
    run_single,
    run_torch_pp,
)


def _subprocess(variant: str, argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--variant", variant, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="raw", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["single", "torch", "ours", "codecs"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    parser.add_argument("--png", default=str(ROOT / "benchmarks" / "results" / "timeline.png"))
    return parser.parse_args(argv)


def _run_variant(args: argparse.Namespace) -> None:
    """``--variant``: run one measurement in this process and print its JSON result (the last line)."""
    if args.variant == "single":
        print(json.dumps(run_single(args)))
    elif args.variant == "torch":
        print(json.dumps(run_torch_pp(args)))
    elif args.variant == "ours":
        print(json.dumps(run_ours(args, args.cpu_layers, args.codec)))
    elif args.variant == "codecs":
        print(json.dumps(codec_errors(args)))


def _measure(args: argparse.Namespace, fixed: int, auto: int) -> tuple[dict, dict]:
    """Every variant one after the other, each in a fresh subprocess; then the codecs."""
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
    results = {}
    for key, variant, extra in (
        ("single", "single", []),
        ("torch_1f1b", "torch", []),
        ("ours_fixed", "ours", [f"--cpu-layers={fixed}"]),
        ("ours_auto", "ours", [f"--cpu-layers={auto}"]),
        ("ours_fixed_bf16_wire", "ours", [f"--cpu-layers={fixed}", "--codec=bf16"]),
    ):
        print(f"running {key} ...", flush=True)
        results[key] = _subprocess(variant, common + extra)
        print(f"  {results[key]['step_seconds']:.3f} s/step", flush=True)
    codecs = _subprocess("codecs", common)
    return results, codecs


def _print_table(args: argparse.Namespace, results: dict, codecs: dict, sps: dict, bound: float) -> None:
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


def _summary(args, argv, shape, split, results: dict, codecs: dict, sps: dict, bound: float) -> dict:
    """The JSON result written to --out."""
    from redheart.model import count_parameters

    return {
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


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.variant is not None:
        _run_variant(args)
        return 0

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
    results, codecs = _measure(args, fixed, split.cpu_layers)
    sps = {k: args.batch / v["step_seconds"] for k, v in results.items()}
    bound = 1 / (args.micro_batches + 1)
    _print_table(args, results, codecs, sps, bound)
    summary = _summary(args, argv, shape, split, results, codecs, sps, bound)
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
