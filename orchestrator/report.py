"""What a finished run writes for people: report.json, loss.png, explanations.jsonl, the trace
files, and the one-line summaries of validation entries in the log and on the console."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from orchestrator.plots import plot_losses, plot_trace_step
from orchestrator.stages import short_name
from redheart.heads import validation_metric_names
from redheart.model import resolve_model_shape

log = logging.getLogger(__name__)


def fmt_metrics(entry: dict) -> str:
    """A validation entry as one line: each metric with its baselines."""
    m, b = entry["metrics"], entry["baseline"]
    parts = []
    for key in validation_metric_names():
        if key in m:
            bow = f", bag-of-words {b['baseline_bow_' + key]:.4f}" if "baseline_bow_" + key in b else ""
            parts.append(f"{key} {m[key]:.4f} (baseline {b.get('baseline_' + key, float('nan')):.4f}{bow})")
    return ", ".join(parts)


def log_run(run_id: str, counts, data, batches, services, cfg) -> None:
    """The run's opening line: parameters per stage, data, steps, batch shape."""
    info = services.stage_info
    last = services.stages[-1]
    stages = "; ".join(
        # The stage's own count (Describe): a middle stage has no entry in count_parameters.
        f"{s.label} {info[s.name].num_parameters}{f' on {info[s.name].device}' if s is last else ''}: "
        f"{info[s.name].layer_range}"
        for s in services.stages
    )
    log.info(
        "run %s: %d parameters (%s), %d train / %d validation scenarios, "
        "%d steps (%d per epoch), batch %d x %d micro-batches x %d accumulation",
        run_id,
        counts["total"],
        stages,
        len(data.train),
        len(data.validation),
        batches.total_steps,
        batches.steps_per_epoch,
        cfg.train.batch_size,
        cfg.micro_batches,
        cfg.train.gradient_accumulation_steps,
    )


def step_entry(step: int, epoch: int, lr: float, outcome, memory: dict[str, int]) -> dict[str, Any]:
    """The loss history's entry of a logged step (report.json's loss_history, loss.png)."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": outcome.total_loss,
        "losses": outcome.losses,
        "learning_rate": lr,
        "grad_norm": outcome.grad_norm,
        "step_seconds": outcome.seconds,
        "samples_per_second": outcome.samples / outcome.seconds if outcome.seconds else 0.0,
        "regret_mean": outcome.regret_mean,
        "regret_computations": outcome.regret_computations,
        "bentham_evaluations": outcome.bentham_evaluations,
        "bubble": {
            short_name(k): (v["wait"] / v["total"] if v["total"] else 0.0)
            for k, v in outcome.stage_timings.items()
        },
        "rss_bytes": memory,
        "skipped": outcome.skipped,
        "peak_gpu_memory_bytes": outcome.peak_gpu_memory_bytes,
        "loss_scale": outcome.loss_scale,
    }


def step_line(entry: dict[str, Any], total_steps: int, outcome) -> str:
    """The progress line of a logged step."""
    heads = " ".join(f"{h}={v:.4f}" for h, v in sorted(outcome.losses.items()))
    memory = entry["rss_bytes"]
    return (
        f"step {entry['step']}/{total_steps} epoch {entry['epoch']} loss {outcome.total_loss:.4f} ({heads}) "
        f"lr {entry['learning_rate']:.2e} |g| {outcome.grad_norm:.3f} {outcome.seconds:.3f}s/step "
        f"{entry['samples_per_second']:.1f} samples/s regret {outcome.regret_mean:.4f} "
        f"rss {' '.join(f'{k}={v / 2**20:.0f}MiB' for k, v in memory.items())}"
    )


def write_explanations(path: Path, ids, scores, pred) -> None:
    """explanations.jsonl: per validation scenario, its regret and the utilities behind it."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, sid in enumerate(ids):
            record = {
                "scenario_id": sid,
                "regret": float(scores.regret[i]),
                "predicted_regret": float(pred["regret"][i]),
                "best_counterfactual": scores.best_name[i],
                "actual_utility": float(scores.actual_utility[i]),
                "counterfactual_utilities": [float(x) for x in scores.counterfactual_utilities[i]],
                "actual_perspective_utilities": [float(x) for x in scores.actual_perspectives[i]],
                "best_perspective_utilities": [float(x) for x in scores.best_perspectives[i]],
                "predicted_bentham": [round(float(x), 6) for x in pred["bentham"][i]],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_trace(trace, output_dir: Path) -> dict[str, str] | None:
    """trace.json (and a picture of its last step) under --trace; None without it."""
    if trace is None:
        return None
    path = trace.write(output_dir)
    out = {"json": str(path)}
    try:
        last = trace.last
        png = plot_trace_step(trace.events(), last, output_dir / f"trace-step-{last}.png")
        if png is not None:
            out["png"] = str(png)
    except Exception as exc:  # a picture must never fail a finished run
        log.warning("could not draw the trace picture: %s", exc)
    log.info(
        "pipeline trace of steps %d-%d: %s (open in https://ui.perfetto.dev or chrome://tracing)",
        trace.first,
        trace.last,
        path,
    )
    return out


def write_products(report: dict, output_dir: Path, history: list, validation: list) -> None:
    """report.json and loss.png."""
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    try:
        plot_losses(history, output_dir / "loss.png", validation)
    except Exception as exc:  # a plot must never fail a finished run
        log.warning("could not draw loss.png: %s", exc)
    log.info("report: %s", output_dir / "report.json")


def _regret_summary(totals: dict, regret_sum: float, regret_n: int, steps: int, output_dir: Path) -> dict:
    samples = max(1, totals["samples"])
    return {
        "computations": totals["regret_computations"],
        "bentham_evaluations": totals["bentham_evaluations"],
        "computations_per_scenario": totals["regret_computations"] / samples,
        "bentham_evaluations_per_scenario": totals["bentham_evaluations"] / samples,
        "computations_per_step": totals["regret_computations"] / max(1, steps),
        "mean_regret": regret_sum / regret_n if regret_n else 0.0,
        "explanations": str(output_dir / "explanations.jsonl"),
    }


def _split_summary(config, split_choice) -> dict:
    return {
        "cpu_layers": resolve_model_shape(config.model).cpu_layers,
        "automatic": split_choice is not None,
        "reason": split_choice.reason
        if split_choice is not None
        else "model.gpu_layers_ratio / model.cpu_layers",
        "predicted_step_seconds": split_choice.predicted_step_seconds if split_choice is not None else None,
    }


def _stage_summary(address: str, info) -> dict:
    return {
        "address": address,
        "device": info.device,
        "layers": info.layer_range,
        "parameters": info.num_parameters,
        "device_name": info.device_name,
        "compute_capability": info.compute_capability,
        "memory_budget_bytes": info.memory_budget_bytes,
        "device_total_memory_bytes": info.total_memory_bytes,
    }


def build_report(trainer, run_id, step, batches, data, counts, wall_start, last_checkpoint, stopped_early):
    """report.json's content, from the trainer's tallies and its services' answers."""
    t, tally = trainer, trainer.tally
    services = t.services
    wall = time.time() - wall_start
    step_seconds = tally.totals["step_seconds"] or 1e-9
    return {
        "run_id": run_id,
        "config": t.config.to_dict(),
        "parameters": {
            **{s.name: services.stage_info[s.name].num_parameters for s in services.stages},
            "total": counts["total"],
        },
        "stages": {n: _stage_summary(services.addresses[n], i) for n, i in services.stage_info.items()},
        "steps": step,
        "total_steps": batches.total_steps,
        "steps_per_epoch": batches.steps_per_epoch,
        "epochs": step / batches.steps_per_epoch,
        "stopped_early": stopped_early,
        "wall_seconds": wall,
        "train_seconds": tally.totals["step_seconds"],
        "samples": tally.totals["samples"],
        "tokens": tally.totals["tokens"],
        "samples_per_second": tally.totals["samples"] / step_seconds,
        "tokens_per_second": tally.totals["tokens"] / step_seconds,
        "skipped_steps": tally.totals["skipped_steps"],
        "loss_history": tally.history,
        "validation": tally.validation,
        "final_validation": tally.validation[-1] if tally.validation else None,
        "regret": _regret_summary(tally.totals, tally.regret_sum, tally.regret_n, step, t.output_dir),
        "peak_rss_bytes": t.peak_rss,
        "peak_gpu_memory_bytes": max([h.get("peak_gpu_memory_bytes", 0) for h in tally.history] or [0]),
        "precision": {
            n: {"used": c.precision, "reason": c.precision_reason} for n, c in services.clients.items()
        },
        "loss_scale": t._loss_scale_state,
        "restarts": t.restarts,
        "recoveries": t.recoveries,
        "data": data.summary(),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "init_from": t.init_spec,
        "split": _split_summary(t.config, t.split_choice),
    }
