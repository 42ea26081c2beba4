"""The user's workload: the `base` preset (~200M parameters) at batch 8 on the bundled corpus.

    .venv/bin/python benchmarks/workload.py [--steps 6] [--batch 8] [--bucketing both|on|off]
                                            [--mixed-precision both|on|off]
                                            [--micro-batch N] [--split auto|N]
                                            [--out benchmarks/results/workload.json]

Side by side in one run, on the same batches (same corpus, tokenizer, seed, micro-batches):

* **pipeline**: a real local run through ``redheart-orchestrate`` (CPU stage + GPU stage + regret
  service as processes, gRPC, 1F1B, one plan per optimizer step, fused AdamW, each micro-batch
  padded to its longest text);
* **single process**: the same model trained by ``orchestrator/reference.py`` in this process with
  every core, the same micro-batches in order (the yardstick of ``--verify``).

For each it prints s/step (median after the first step), real (non-pad) tokens/s, the padding
fraction, and for the pipeline each stage's busy fraction and the bubble; then the ratio
pipeline / single process and the projected hours of the original workload (3 epochs x 28,882
scenarios at batch 8 = 10,830 optimizer steps) at the measured step time. ``--bucketing both``
repeats both variants with ``data.length_bucketing`` on; ``--mixed-precision both`` repeats them in
bf16 autocast (``train.use_mixed_precision``: the stages and the single process both autocast,
activations and gradients cross the wire in bf16; on CPUs with AMX this is where the speed is).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORIGINAL_SCENARIOS = 28_882
ORIGINAL_EPOCHS = 3
CORPUS = ROOT / "runs" / "data" / "scenarios.jsonl"
# The stages' validation pass and final checkpoint are not part of the step time; a small corpus
# slice keeps them short. The length distribution is the corpus's: the slice is the file's head,
# which the generator writes in a shuffled order.
MAX_SCENARIOS = 1200
BASE_LAYERS = 13  # redheart.model.PRESETS["base"]["num_layers"]


@dataclass(frozen=True)
class Variant:
    bucketing: bool
    mixed: bool

    @property
    def name(self) -> str:
        return ("length_bucketing" if self.bucketing else "length_aware") + (
            "_bf16" if self.mixed else "_fp32"
        )


def _overrides(args, variant: Variant, tokenizer: Path) -> list[str]:
    sets = [
        'model.preset="base"',
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}",
        "train.log_every_n_steps=1",
        "train.warmup_steps=0",
        f"data.max_scenarios={MAX_SCENARIOS}",
        f"data.length_bucketing={'true' if variant.bucketing else 'false'}",
        f"train.use_mixed_precision={'true' if variant.mixed else 'false'}",
        f'data.path="{CORPUS}"',
        f'data.tokenizer_path="{tokenizer}"',
        "checkpoint.save_checkpoint_every=0",
        "train.eval_every_epoch=false",
    ]
    if args.split == "auto":
        sets.append('model.gpu_layers_ratio="auto"')
    else:
        sets.append(f"model.cpu_layers={int(args.split)}")
    return sets


def _config(args, variant: Variant, tokenizer: Path, out_dir: Path):
    from redheart.config import load_config

    sets = _overrides(args, variant, tokenizer) + [f'orchestrator.output_dir="{out_dir}"']
    return load_config(ROOT / "examples" / "hybrid.toml", overrides=sets, env={})


def run_pipeline(args, variant: Variant, tokenizer: Path, tmp: Path) -> dict:
    out_dir = tmp / f"pipeline-{variant.name}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "--config", str(ROOT / "examples" / "hybrid.toml")]
    for s in _overrides(args, variant, tokenizer) + [
        'orchestrator.progress="log"',
        "metrics.enabled=false",
    ]:
        cmd += ["--set", s]
    cmd += ["--output-dir", str(out_dir)]
    print("pipeline:", " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    if proc.returncode != 0:
        raise SystemExit(f"pipeline run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads((out_dir / "report.json").read_text())
    history = report["loss_history"]
    steps = [h["step_seconds"] for h in history]
    tail = history[1:] if len(history) > 1 else history
    return {
        "step_seconds_each": steps,
        "step_seconds": statistics.median(h["step_seconds"] for h in tail),
        "split": report["split"],
        "stages": report["stages"],
        "bubble": {k: statistics.median(h["bubble"][k] for h in tail) for k in tail[0]["bubble"]},
        "peak_rss_bytes": report["peak_rss_bytes"],
        "cpu_layers": report["split"]["cpu_layers"],
    }


def run_single_process(args, variant: Variant, tokenizer: Path, tmp: Path, cpu_layers: int) -> dict:
    import torch

    from orchestrator.batching import computed_tokens, step_micro_batches
    from orchestrator.data import StepBatches, prepare_data
    from orchestrator.reference import SingleProcessTrainer

    cfg = _config(args, variant, tokenizer, tmp / f"single-{variant.name}").replace(
        **{"model.cpu_layers": cpu_layers}
    )
    torch.set_num_threads(os.cpu_count() or 1)
    data = prepare_data(cfg, tmp / f"single-{variant.name}", tokenizer_path=tokenizer)
    batches = StepBatches(cfg, data.train)
    trainer = SingleProcessTrainer(cfg)
    times, real, computed = [], 0, 0
    for step in range(args.steps):
        rounds = batches.rounds(step)
        parts = step_micro_batches(rounds, cfg.train.micro_batch_size, cfg.train.pad_to_multiple_of)
        start = time.perf_counter()
        trainer.step(step, rounds, cfg.train.learning_rate)
        times.append(time.perf_counter() - start)
        if step:  # the same steps the pipeline's median is over
            real += sum(int(p.tensors["attention_mask"].sum()) for p in parts)
            computed += computed_tokens(parts)
    padded_full = (
        (args.steps - 1) * args.batch * cfg.train.gradient_accumulation_steps * data.train.input_ids.shape[1]
    )
    return {
        "step_seconds_each": times,
        "step_seconds": statistics.median(times[1:]),
        "threads": torch.get_num_threads(),
        "micro_batch_size": cfg.train.micro_batch_size,
        "real_tokens_per_step": real / max(1, args.steps - 1),
        "padding_fraction": 1 - real / computed if computed else 0.0,
        "padding_fraction_at_max_seq_len": 1 - real / padded_full if padded_full else 0.0,
    }


def _ensure_inputs(tmp: Path) -> Path:
    """The bundled corpus (generated once) and one tokenizer both variants share."""
    from redheart.data import load_jsonl, train_tokenizer
    from redheart.data.generate import write_jsonl
    from redheart.model import PRESETS

    if not CORPUS.exists():
        CORPUS.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(CORPUS, ORIGINAL_SCENARIOS, 0)
    tokenizer = tmp / "tokenizer.json"
    texts = [s.text for s in load_jsonl(CORPUS).scenarios[:MAX_SCENARIOS]]
    train_tokenizer(iter(texts), PRESETS["base"]["vocab_size"], tokenizer)
    return tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bucketing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--mixed-precision", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="texts per micro-batch (0: the config's automatic choice, 4 micro-batches per stage)",
    )
    parser.add_argument("--split", default="auto", help='"auto" (measured) or the number of CPU-stage layers')
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "workload.json"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    choice = {"both": (False, True), "on": (True,), "off": (False,)}
    variants = [Variant(b, m) for m in choice[args.mixed_precision] for b in choice[args.bucketing]]
    total_steps = ORIGINAL_EPOCHS * (ORIGINAL_SCENARIOS // args.batch)
    results = {
        "batch": args.batch,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "machine": _machine(),
        "original_steps": total_steps,
        "command": "benchmarks/workload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "variants": {},
    }
    print("machine:", ", ".join(f"{k} {v}" for k, v in results["machine"].items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = _ensure_inputs(tmp)
        for variant in variants:
            name = variant.name
            pipe = run_pipeline(args, variant, tokenizer, tmp)
            single = run_single_process(args, variant, tokenizer, tmp, pipe["cpu_layers"])
            tokens = single["real_tokens_per_step"]
            pipe["real_tokens_per_second"] = tokens / pipe["step_seconds"]
            single["real_tokens_per_second"] = tokens / single["step_seconds"]
            entry = {
                "pipeline": pipe,
                "single_process": single,
                "pipeline_over_single_process": single["step_seconds"] / pipe["step_seconds"],
                "projected_hours": {
                    "pipeline": total_steps * pipe["step_seconds"] / 3600,
                    "single_process": total_steps * single["step_seconds"] / 3600,
                },
            }
            results["variants"][name] = entry
            _print(name, entry, args, total_steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


def _machine() -> dict:
    """What the figures depend on beyond the core count: bf16 runs several times faster with bf16
    instructions (AMX, AVX512-BF16) than without, so hours measured on two machines compare only
    when these match."""
    import torch

    from redheart.precision import cpu_native_bf16

    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {"cpu": model, "simd": torch.backends.cpu.get_cpu_capability(), "bf16_hardware": cpu_native_bf16()}


def _print(name: str, e: dict, args, total_steps: int) -> None:
    p, s = e["pipeline"], e["single_process"]
    busy = ", ".join(f"{k} {1 - v:.0%}" for k, v in p["bubble"].items())
    print(
        f"\n== {name}: base preset, batch {args.batch} = {args.batch // s['micro_batch_size']} micro-batches of "
        f"{s['micro_batch_size']}, split {p['cpu_layers']} CPU layers / {BASE_LAYERS - p['cpu_layers']} GPU layers"
    )
    print(
        f"padding: {s['padding_fraction']:.1%} of computed positions (every sample padded to max_seq_len: "
        f"{s['padding_fraction_at_max_seq_len']:.1%}); {s['real_tokens_per_step']:.0f} real tokens per step"
    )
    print(f"{'':<16}{'s/step':>8}{'real tok/s':>12}{'hours':>8}")
    print(
        f"{'pipeline':<16}{p['step_seconds']:>8.2f}{p['real_tokens_per_second']:>12.0f}{e['projected_hours']['pipeline']:>8.1f}"
        f"   busy: {busy}; bubble {max(p['bubble'].values()):.0%}"
    )
    print(
        f"{'single process':<16}{s['step_seconds']:>8.2f}{s['real_tokens_per_second']:>12.0f}"
        f"{e['projected_hours']['single_process']:>8.1f}   {s['threads']} threads"
    )
    print(
        f"pipeline / single process: {e['pipeline_over_single_process']:.2f}x; original workload "
        f"({total_steps} steps) projected at {e['projected_hours']['pipeline']:.1f} h through the pipeline"
    )


if __name__ == "__main__":
    sys.exit(main())
