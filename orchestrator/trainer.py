"""HybridDistributedTrainer: a whole training run across the CPU stage, the GPU stage and the
regret service, as the original prototype promised::

    report, checkpoint = HybridDistributedTrainer(HybridConfig(...)).train()

One run: prepare data and tokenizer -> start (local) or reach (remote) the services -> handshake
(model fingerprints must agree) -> start or resume the run -> optimizer steps with logging,
evaluation and coordinated checkpoints -> final evaluation, explanations, report.json, loss.png.
A service that dies mid-step aborts that step on every stage; the run then recovers from the last
complete checkpoint (restarting the service itself in local mode) and goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import torch
from prometheus_client import CollectorRegistry

from orchestrator import checkpoint as ckpt
from orchestrator import run_products
from orchestrator.data import PreparedData, StepBatches, prepare_data, to_batch
from orchestrator.launcher import LaunchError, LocalLauncher
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.pipeline import DynamicLossScale, NonFiniteError, PipelineDriver, StepOutcome
from orchestrator.plots import plot_losses, plot_trace_step
from orchestrator.progress import Progress
from orchestrator.recovery import PhaseFailed, Recovery, RecoveryStopped, phase
from orchestrator.stage_client import StageClient
from orchestrator.trace import TraceRecorder
from redheart.config import HybridConfig, diff_settings
from redheart.metrics_common import start_metrics_endpoint
from redheart.model import count_parameters, resolve_model_shape
from redheart.rpc import RetryPolicy, ServiceError, wait_for_serving

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclasses.dataclass
class _Loop:
    """Where the training loop stands; a recovery rewinds `step` to the last checkpoint."""

    step: int | None = None  # steps completed; None until the stages were started
    last_checkpoint: Path | None = None
    stopped_early: bool = False


def learning_rate_at(step: int, total_steps: int, train) -> float:
    """Warm-up then cosine / linear decay to min_lr_ratio x peak, or constant."""
    peak = train.learning_rate
    if train.warmup_steps and step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.scheduler_type == "constant":
        return peak
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = peak * train.min_lr_ratio
    if train.scheduler_type == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OutputLock:
    """One run per output directory: a lock file holding the pid; stale when that process is gone."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self.held = False

    def holder(self) -> int | None:
        try:
            pid = int(self.path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if pid == os.getpid():
            return None
        return pid if psutil.pid_exists(pid) else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        other = self.holder()
        if other is not None:
            raise RunError(
                f"{self.path.parent} is in use by another run (pid {other}); "
                f"fix: wait for it, stop it, or pass another --output-dir"
            )
        self.path.write_text(f"{os.getpid()} {time.time():.0f}\n")
        self.held = True

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


def _settings_for_stages(config: HybridConfig) -> dict[str, Any]:
    return {
        "train": dataclasses.asdict(config.train),
        "regret": dataclasses.asdict(config.regret),
        "empty_cache_every": config.gpu_stage.empty_cache_every,
    }


class HybridDistributedTrainer:
    def __init__(
        self,
        config: HybridConfig,
        *,
        registry: CollectorRegistry | None = None,
        resume: str | bool | None = None,
        config_path: str | None = None,
        trace_steps: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        # --trace FIRST-LAST: spans of those steps from every process, written to trace.json
        self.trace = TraceRecorder(trace_steps) if trace_steps else None
        self.registry = registry or CollectorRegistry()
        self.metrics = OrchestratorMetrics(self.registry)
        self.resume = resume
        self.config_path = config_path
        self.output_dir = config.output_dir()
        self.checkpoint_root = config.checkpoint_dir()
        self.launcher: LocalLauncher | None = None
        self.clients: dict[str, StageClient] = {}
        self.addresses: dict[str, str] = {}
        self.stage_info: dict[str, Any] = {}
        self.restarts: dict[str, int] = {"cpu_stage": 0, "gpu_stage": 0, "regret": 0}
        self.recoveries: list[dict[str, Any]] = []
        self.stop_requested = threading.Event()
        self._reset_progress()
        self.peak_rss: dict[str, int] = {}
        self._progress: Progress | None = None
        self._tb = None  # the TensorBoard writer when metrics.tensorboard is on
        self.metrics_port = 0
        self.split_choice = None
        self._bow = None  # the bag-of-words baseline, fitted once per run on the train split
        self.init_spec: dict[str, str] | None = None  # model.init_from, as the stages receive it
        self._last_info: ckpt.CheckpointInfo | None = None  # the checkpoint a recovery goes back to
        self._loss_scale_state: dict[str, Any] = {}

    def _reset_progress(self) -> None:
        """What a run has done so far: empty at the start, and again when a recovery finds no checkpoint."""
        self.history: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.totals = {
            "samples": 0,
            "tokens": 0,
            "regret_computations": 0,
            "bentham_evaluations": 0,
            "skipped_steps": 0,
            "step_seconds": 0.0,
        }
        self.regret_sum = 0.0
        self.regret_n = 0

    # ------------------------------------------------------------------ services

    def _open_services(self, stack: ExitStack) -> None:
        cfg = self.config
        regret_needed = cfg.regret.enabled and cfg.regret.address != "inprocess"
        if cfg.launch.mode == "local":
            log_dir = Path(cfg.launch.log_dir) if cfg.launch.log_dir else self.output_dir / "logs"
            resolved = self.output_dir / "config.toml"
            self.launcher = LocalLauncher(cfg, resolved, log_dir)
            stack.callback(self.launcher.stop_all)
            names = ["cpu_stage", "gpu_stage"] + (["regret"] if regret_needed else [])
            try:
                self.launcher.start(names)
            except LaunchError as exc:
                raise RunError(str(exc)) from None
            self.addresses = {n: self.launcher.services[n].address for n in names}
        else:
            self.addresses = {"cpu_stage": cfg.cpu_stage_address(), "gpu_stage": cfg.gpu_stage_address()}
            if regret_needed:
                self.addresses["regret"] = cfg.regret_address()
        self.addresses.setdefault("regret", "inprocess" if cfg.regret.enabled else "")
        timeout = cfg.orchestrator.connect_timeout_seconds
        for name in ("cpu_stage", "gpu_stage") + (("regret",) if regret_needed else ()):
            try:
                wait_for_serving(
                    self.addresses[name],
                    timeout=timeout,
                    service_name=name.replace("_", " "),
                    alive=self._alive_check(name),
                    security=cfg.security,
                )
            except ServiceError as exc:
                raise RunError(
                    f"{exc} (fix: start it with `redheart-{name.replace('_', '-')} --config ...` "
                    f"or check {name}.address)"
                ) from None
        for name in ("cpu_stage", "gpu_stage"):
            self.clients[name] = StageClient(
                name.replace("_", " "),
                self.addresses[name],
                max_message_mb=cfg.wire.max_message_mb,
                rpc_timeout=cfg.orchestrator.rpc_timeout_seconds,
                security=cfg.security,
                retry=RetryPolicy.from_wire(cfg.wire),
                alive=self._alive_check(name),
            )
            stack.callback(self.clients[name].close)

    def _alive_check(self, name: str):
        if self.launcher is None or name not in self.launcher.services:
            return None
        return self.launcher.services[name].alive

    def _handshake(self) -> None:
        mine = self.config.model_settings()
        fp = self.config.model_fingerprint()
        for name, expected_rank in (("cpu_stage", 0), ("gpu_stage", 1)):
            info = self.clients[name].describe()
            if info.rank != expected_rank:
                raise RunError(
                    f"{name} at {self.addresses[name]} is pipeline stage {info.rank} ({info.name}), expected stage {expected_rank}; "
                    f"are cpu_stage.address and gpu_stage.address swapped?"
                )
            if info.fingerprint != fp:
                diffs = diff_settings(mine, info.settings)
                raise RunError(
                    f"{name} at {self.addresses[name]} was started with different model settings: "
                    f"{'; '.join(diffs)} (fix: start every service with the same [model] section)"
                )
            self.stage_info[name] = info

    def _start_run(self, run_id: str, first_step: int) -> None:
        settings = _settings_for_stages(self.config)
        if self.init_spec is not None:
            settings["init_from"] = self.init_spec  # each stage loads its own part when it (re)builds
        cpu, gpu = self.addresses["cpu_stage"], self.addresses["gpu_stage"]
        regret = self.addresses.get("regret", "")
        links = {
            "cpu_stage": dict(next_address=gpu, prev_address="", regret_address=""),
            "gpu_stage": dict(next_address="", prev_address=cpu, regret_address=regret),
        }
        for name, link in links.items():
            self._retry_while_running(
                lambda name=name, link=link: self.clients[name].start_run(
                    run_id, settings, first_step=first_step, reinitialize=True, **link
                )
            )
        if self.trace is not None:  # measured at every StartRun: a restarted stage has a new clock
            self.trace.measure_clocks(self.clients)
            for client in self.clients.values():
                client.trace = self.trace

    def _span(self, name: str, step: int):
        """An orchestrator span for the trace (0-based `step`); nothing without --trace."""
        return self.trace.span(name, step) if self.trace is not None else contextlib.nullcontext()

    def _write_trace(self) -> dict[str, str] | None:
        if self.trace is None:
            return None
        path = self.trace.write(self.output_dir)
        out = {"json": str(path)}
        try:
            last = self.trace.last
            png = plot_trace_step(self.trace.events(), last, self.output_dir / f"trace-step-{last}.png")
            if png is not None:
                out["png"] = str(png)
        except Exception as exc:  # a picture must never fail a finished run
            log.warning("could not draw the trace picture: %s", exc)
        log.info(
            "pipeline trace of steps %d-%d: %s (open in https://ui.perfetto.dev or chrome://tracing)",
            self.trace.first,
            self.trace.last,
            path,
        )
        return out

    def _retry_while_running(self, call):
        """A stage still inside a round (its orchestrator died mid-step, or the round is being
        aborted) refuses control calls with FAILED_PRECONDITION "... is running" until it leaves
        the round: its lease ends it. Retry for at most orchestrator.connect_timeout_seconds."""
        give_up = time.monotonic() + self.config.orchestrator.connect_timeout_seconds
        delay = 0.2
        while True:
            try:
                return call()
            except ServiceError as exc:
                running = (
                    exc.code is not None
                    and exc.code.name == "FAILED_PRECONDITION"
                    and "is running" in exc.details
                )
                if not running or time.monotonic() + delay > give_up or self.stop_requested.is_set():
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _take_over(self, run_id: str) -> None:
        """Remote --resume: a stage may still be inside a round of this run that its previous
        orchestrator (now dead: it held the output directory's lock) never finished. Abort that
        round so StartRun does not wait for the round's deadline."""
        for name, client in self.clients.items():
            info = self.stage_info.get(name)
            if info is not None and info.run_id == run_id:
                try:
                    client.abort(run_id, info.next_step, "a new orchestrator resumes this run")
                except ServiceError as exc:
                    log.info(
                        "%s: abort of the previous orchestrator's step %d: %s", name, info.next_step, exc
                    )

    def _restore(self, run_id: str, info: ckpt.CheckpointInfo | None) -> int:
        """Put both stages at a checkpoint (or at the initial weights when there is none)."""
        step = info.step if info is not None else 0
        self._start_run(run_id, step)
        if info is not None:
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(self.clients[n].load, run_id, step, str(info.path / n.split("_")[0]))
                    for n in ("cpu_stage", "gpu_stage")
                ]
                for f in futures:
                    f.result()
        return step

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(
        self, run_id: str, step: int, batches: StepBatches, driver: PipelineDriver, data: PreparedData
    ) -> Path:
        start = time.perf_counter()
        directory = ckpt.step_dir(self.checkpoint_root, step)
        if directory.exists():
            shutil.rmtree(directory)  # a leftover of an interrupted save: redo it
        directory.mkdir(parents=True)
        with ThreadPoolExecutor(2) as pool:
            futures = {
                n: pool.submit(self.clients[n].save, run_id, step, str(directory / n.split("_")[0]))
                for n in ("cpu_stage", "gpu_stage")
            }
            shards = {n: f.result() for n, f in futures.items()}
        epoch, offset = batches.position(step)
        manifest = {
            "run_id": run_id,
            "step": step,
            "epoch": epoch,
            "step_in_epoch": offset,
            "model_fingerprint": self.config.model_fingerprint(),
            "config": self.config.to_dict(),
            "tokenizer": str(data.tokenizer_path),
            "tokenizer_sha256": data.tokenizer_sha256,
            "loss_scale": driver.scaler.state(),
            "shards": {
                n: {"sha256": s.sha256, "bytes": s.bytes, "files": list(s.files)} for n, s in shards.items()
            },
            "history": self.history,
            "validation": self.validation,
            "totals": self.totals,
            "regret_sum": self.regret_sum,
            "regret_n": self.regret_n,
            "restarts": self.restarts,
        }
        manifest["baselines"] = self._write_baselines(directory, data)
        ckpt.write_manifest(directory, manifest)
        self._last_info = ckpt.CheckpointInfo(directory, step, manifest)
        ckpt.prune(self.checkpoint_root, self.config.checkpoint.keep_last)
        seconds = time.perf_counter() - start
        self.metrics.checkpoint_seconds.observe(seconds)
        self.metrics.checkpoints.inc()
        log.info(
            "checkpoint step %d -> %s (%.2fs, %.1f MB)",
            step,
            directory,
            seconds,
            sum(s.bytes for s in shards.values()) / 1e6,
        )
        return directory

    def _bow_baseline(self, data: PreparedData):
        if self._bow is None:
            self._bow = run_products.fit_bow(self.config, data)
        return self._bow

    def _write_baselines(self, directory: Path, data: PreparedData) -> dict[str, str]:
        mean = self.regret_sum / self.regret_n if self.regret_n else None
        return run_products.write_baselines(directory, data, self._bow_baseline(data), mean)

    def _check_init_from(self) -> dict[str, str] | None:
        try:
            return run_products.check_init_from(self.config)
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def _restore_orchestrator_state(self, manifest: dict[str, Any], driver: PipelineDriver | None) -> None:
        self.history = list(manifest.get("history", []))
        self.validation = list(manifest.get("validation", []))
        self.totals.update(manifest.get("totals", {}))
        self.regret_sum = float(manifest.get("regret_sum", 0.0))
        self.regret_n = int(manifest.get("regret_n", 0))
        for k, v in manifest.get("restarts", {}).items():
            self.restarts[k] = max(self.restarts.get(k, 0), int(v))
        if driver is not None:
            driver.scaler.load(manifest.get("loss_scale", {}))

    # ------------------------------------------------------------------ recovery

    def _restore_last(self, run_id: str, driver: PipelineDriver) -> int:
        """Recovery's restore: every stage and the orchestrator's own state back at the last
        complete checkpoint of this run (the initial weights when there is none)."""
        info = self._last_complete(run_id)
        step = self._restore(run_id, info)
        self._set_loss_scaling(driver)  # the first StartRun may have been this one
        self._last_info = info
        if info is not None:
            self._restore_orchestrator_state(info.manifest, driver)
        else:
            self._reset_progress()
            driver.scaler.load(
                {
                    "scale": self.config.train.initial_loss_scale if driver.scaler.enabled else 1.0,
                    "good_steps": 0,
                }
            )
        return step

    def _last_complete(self, run_id: str) -> ckpt.CheckpointInfo | None:
        candidates = []
        if self._last_info is not None:
            try:  # the one we saved or resumed from last; --resume may name one outside checkpoint_dir
                candidates.append(ckpt.resolve(self._last_info.path))
            except ckpt.CheckpointError:
                pass
        latest = ckpt.latest(self.checkpoint_root)
        if latest is not None and latest.manifest.get("run_id") == run_id:
            candidates.append(latest)
        return max(candidates, key=lambda c: c.step) if candidates else None

    # ------------------------------------------------------------------ evaluation

    def _evaluate(
        self, driver: PipelineDriver, data: PreparedData, label: str, explanations_path: Path | None = None
    ) -> dict[str, Any]:
        from redheart import calculus
        from redheart.data import baseline_metrics, compute_metrics

        val = data.validation
        size = self.config.train.batch_size
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(val), size):
            indices = list(range(start, min(start + size, len(val))))
            out = driver.evaluate(to_batch(val, indices))
            for k, v in out.items():
                outputs.setdefault(k, []).append(v)
        pred = {k: torch.cat(v) for k, v in outputs.items()}
        labels = dict(data.validation_labels)  # a copy: regret_target is added below
        scores = calculus.score(
            pred["bentham"].numpy(),
            self.config.regret.regrets_per_step,
            self.config.regret.bentham_per_regret,
        )
        labels["regret_target"] = torch.from_numpy(scores.regret).float()
        metrics = compute_metrics(pred, labels)
        train_labels = dict(data.train_labels)
        if self.regret_n:
            train_labels["regret_target"] = torch.full((len(data.train),), self.regret_sum / self.regret_n)
        baseline = baseline_metrics(train_labels, labels)
        from redheart.data.evaluation import bow_baseline_metrics, compare_with_baselines

        baseline.update(
            bow_baseline_metrics(self._bow_baseline(data), val.input_ids, val.attention_mask, labels)
        )
        entry = {
            "label": label,
            "step": self._current_step,
            "metrics": metrics,
            "baseline": baseline,
            "worse_than_baselines": compare_with_baselines(metrics, baseline),
        }
        if entry["worse_than_baselines"]:
            log.warning(
                "%s validation: the model does worse than a baseline: %s",
                label,
                "; ".join(entry["worse_than_baselines"]),
            )
        for key, value in metrics.items():
            if key in ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae"):
                self.metrics.validation.labels(key).set(value)
        for key, value in baseline.items():
            name = key.removeprefix("baseline_")
            if name in ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae"):
                self.metrics.validation_baseline.labels(name).set(value)
        phase = self._progress.phase("explanations") if self._progress else contextlib.nullcontext()
        if explanations_path is not None:
            with phase, open(explanations_path, "w", encoding="utf-8") as fh:
                for i, sid in enumerate(val.ids):
                    fh.write(
                        json.dumps(
                            {
                                "scenario_id": sid,
                                "regret": float(scores.regret[i]),
                                "predicted_regret": float(pred["regret"][i]),
                                "best_counterfactual": scores.best_name[i],
                                "actual_utility": float(scores.actual_utility[i]),
                                "counterfactual_utilities": [
                                    float(x) for x in scores.counterfactual_utilities[i]
                                ],
                                "actual_perspective_utilities": [
                                    float(x) for x in scores.actual_perspectives[i]
                                ],
                                "best_perspective_utilities": [float(x) for x in scores.best_perspectives[i]],
                                "predicted_bentham": [round(float(x), 6) for x in pred["bentham"][i]],
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
        return entry

    # ------------------------------------------------------------------ the run

    def _record_step(self, outcome: StepOutcome, epoch: int) -> None:
        self.metrics.observe_step(outcome)
        self.metrics.epoch.set(epoch)
        self.metrics.step.set(outcome.step + 1)
        self.totals["samples"] += outcome.samples
        self.totals["tokens"] += outcome.tokens
        self.totals["regret_computations"] += outcome.regret_computations
        self.totals["bentham_evaluations"] += outcome.bentham_evaluations
        self.totals["skipped_steps"] += int(outcome.skipped)
        self.totals["step_seconds"] += outcome.seconds
        if outcome.regret_computations:
            self.regret_sum += outcome.regret_mean
            self.regret_n += 1

    def _sample_memory(self) -> dict[str, int]:
        procs = {"orchestrator": psutil.Process()}
        if self.launcher is not None:
            for name, svc in self.launcher.services.items():
                if svc.alive():
                    try:
                        procs[name] = psutil.Process(svc.pid)
                    except psutil.NoSuchProcess:
                        pass
        out = {}
        for name, proc in procs.items():
            try:
                rss = proc.memory_info().rss
                if name == "regret":  # its workers are child processes: count them too
                    rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            out[name] = rss
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
        return out

    def _install_signal_handlers(self, stack: ExitStack) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            if self.stop_requested.is_set():
                raise KeyboardInterrupt
            log.warning(
                "received %s: finishing the current step, then checkpoint and stop (again to abort)",
                signal.Signals(signum).name,
            )
            self.stop_requested.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        stack.callback(lambda: [signal.signal(s, h) for s, h in previous.items()])

    def _prepare_output(self, stack: ExitStack) -> OutputLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(self.output_dir)
        lock.acquire()
        stack.callback(lock.release)
        (self.output_dir / "config.toml").write_text(self.config.to_toml(), encoding="utf-8")
        return lock

    def _open_tensorboard(self, stack: ExitStack):
        from orchestrator.tensorboard import TensorBoardUnavailable, open_writer

        try:
            writer = open_writer(self.config, self.output_dir)
        except TensorBoardUnavailable as exc:
            raise RunError(str(exc)) from None
        if writer is not None:
            stack.callback(writer.close)
        return writer

    def _start_metrics(self) -> None:
        cfg = self.config
        if cfg.metrics.enabled and cfg.orchestrator.metrics_port:
            port = (
                0
                if cfg.launch.mode == "local" and cfg.launch.ports == "auto"
                else cfg.orchestrator.metrics_port
            )
            try:
                self._metrics_server, self.metrics_port = start_metrics_endpoint(
                    self.registry, cfg.metrics.host, port
                )
            except OSError as exc:
                raise RunError(
                    f"cannot serve orchestrator metrics on {cfg.metrics.host}:{port}: {exc} "
                    f"(fix: another orchestrator.metrics_port, or 0 to disable)"
                ) from None
            log.info("orchestrator metrics on http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)

    def train(self) -> tuple[dict[str, Any], Path]:
        cfg = self.config
        wall_start = time.time()
        self._current_step = 0
        with ExitStack() as stack:
            resume_info = self._resume_info()
            self._resolve_split(resume_info)
            self.init_spec = self._check_init_from()
            self._prepare_output(stack)
            self._tb = self._open_tensorboard(stack)
            self._install_signal_handlers(stack)
            tokenizer_path = None
            if resume_info is not None:
                tokenizer_path = Path(resume_info.manifest["tokenizer"])
                if not tokenizer_path.exists():
                    raise RunError(
                        f"checkpoint {resume_info.path} needs its tokenizer {tokenizer_path}, which is gone"
                    )
            elif self.init_spec is not None:
                # Token ids must mean what they meant to the exported embeddings.
                tokenizer_path = Path(self.init_spec["path"]) / "tokenizer.json"
            data = prepare_data(cfg, self.output_dir, tokenizer_path=tokenizer_path)
            if resume_info is not None and data.tokenizer_sha256 != resume_info.manifest.get(
                "tokenizer_sha256"
            ):
                raise RunError(
                    f"tokenizer {data.tokenizer_path} differs from the one checkpoint {resume_info.path} was trained with"
                )
            batches = StepBatches(cfg, data.train)
            self._start_metrics()
            self._open_services(stack)
            self._handshake()
            shape = resolve_model_shape(cfg.model)
            counts = count_parameters(shape)
            run_id = (
                resume_info.manifest["run_id"] if resume_info is not None else f"run-{uuid.uuid4().hex[:12]}"
            )
            gpu_device = self.stage_info["gpu_stage"].device
            lookahead = (
                cfg.regret.lookahead
                if cfg.regret.enabled and self.addresses.get("regret") not in ("", "inprocess")
                else 0
            )
            # Loss scaling is switched on after StartRun, when the stages have said their precision.
            driver = PipelineDriver(
                self.clients["cpu_stage"],
                self.clients["gpu_stage"],
                cfg,
                run_id,
                fp16_loss_scaling=False,
                lookahead=lookahead,
                dead_services=self.launcher.dead if self.launcher is not None else None,
            )
            stack.callback(driver.close)
            self._last_info = resume_info
            recovery = Recovery(
                cfg,
                self.launcher,
                self.addresses,
                self.clients,
                self.restarts,
                self.recoveries,
                self.stop_requested,
                restore=lambda: self._restore_last(run_id, driver),
                on_restart=lambda name: self.metrics.restarts.labels(name).inc(),
            )
            run = _Loop(last_checkpoint=resume_info.path if resume_info is not None else None)
            self._log_run(run_id, counts, data, batches, gpu_device)
            progress = self._progress = Progress(batches.total_steps, cfg.orchestrator.progress)
            stack.callback(progress.close)
            # The one recovery loop: a phase that fails on a fault (a killed or unreachable service)
            # ends up here, and the run goes on from the last complete checkpoint.
            while True:
                try:
                    if run.step is None:
                        run.step = self._begin(run_id, resume_info, driver)
                    self._train_steps(run, run_id, driver, data, batches, progress)
                    self._final_evaluation(run, driver, data, batches, progress)
                    self._final_checkpoint(run, run_id, driver, data, batches)
                    break
                except PhaseFailed as failure:
                    try:
                        run.step = recovery.recover(failure)
                    except RecoveryStopped as exc:
                        raise RunError(f"{failure}; {exc}") from None
                    run.last_checkpoint = self._last_info.path if self._last_info is not None else None
            step, last_checkpoint = run.step, run.last_checkpoint
            self._current_step = step
            self._sample_memory()
            self._loss_scale_state = driver.scaler.state()
            report = self._report(
                run_id, step, batches, data, counts, wall_start, last_checkpoint, run.stopped_early
            )
            report["trace"] = self._write_trace()
            (self.output_dir / "report.json").write_text(
                json.dumps(report, indent=2, sort_keys=True), encoding="utf-8"
            )
            try:
                plot_losses(self.history, self.output_dir / "loss.png", self.validation)
            except Exception as exc:  # a plot must never fail a finished run
                log.warning("could not draw loss.png: %s", exc)
            log.info("report: %s", self.output_dir / "report.json")
            return report, last_checkpoint

    # ------------------------------------------------------------------ the phases of a run

    def _begin(self, run_id: str, resume_info: ckpt.CheckpointInfo | None, driver: PipelineDriver) -> int:
        step = resume_info.step if resume_info is not None else 0
        with phase("StartRun", step):
            if resume_info is not None and self.launcher is None:
                self._take_over(run_id)
            step = self._restore(run_id, resume_info)
        for n in ("cpu_stage", "gpu_stage"):
            log.info("%s trains in %s: %s", n, self.clients[n].precision, self.clients[n].precision_reason)
        self._set_loss_scaling(driver)
        if resume_info is not None:
            self._restore_orchestrator_state(resume_info.manifest, driver)
            log.info("resumed run %s at step %d from %s", run_id, step, resume_info.path)
        return step

    def _set_loss_scaling(self, driver: PipelineDriver) -> None:
        """Each stage chose its precision from its own device at StartRun; fp16 on either needs the scale."""
        fp16 = any(self.clients[n].precision == "fp16" for n in ("cpu_stage", "gpu_stage"))
        if driver.scaler.enabled != fp16:
            t = self.config.train
            driver.scaler = DynamicLossScale(
                fp16, init_scale=t.initial_loss_scale, max_consecutive_skips=t.max_consecutive_skips
            )

    def _log_run(
        self, run_id: str, counts, data: PreparedData, batches: StepBatches, gpu_device: str
    ) -> None:
        cfg = self.config
        log.info(
            "run %s: %d parameters (cpu stage %d: %s; gpu stage %d on %s: %s), %d train / %d validation scenarios, "
            "%d steps (%d per epoch), batch %d x %d micro-batches x %d accumulation",
            run_id,
            counts["total"],
            counts["cpu_stage"],
            self.stage_info["cpu_stage"].layer_range,
            counts["gpu_stage"],
            gpu_device,
            self.stage_info["gpu_stage"].layer_range,
            len(data.train),
            len(data.validation),
            batches.total_steps,
            batches.steps_per_epoch,
            cfg.train.batch_size,
            cfg.micro_batches,
            cfg.train.gradient_accumulation_steps,
        )

    def _train_steps(
        self,
        run: _Loop,
        run_id: str,
        driver: PipelineDriver,
        data: PreparedData,
        batches: StepBatches,
        progress: Progress,
    ) -> None:
        """Optimizer steps with logging, epoch-end evaluation and checkpoints, until the last step or a stop."""
        cfg = self.config
        evaluated_epochs = {v.get("epoch") for v in self.validation}
        while run.step < batches.total_steps:
            step = run.step
            epoch, _ = batches.position(step)
            self._current_step = step
            lr = learning_rate_at(step, batches.total_steps, cfg.train)
            with phase("RunStep", step), self._span(f"step {step + 1}", step):
                try:
                    outcome = driver.run_step(step, batches.rounds(step), lr)
                except NonFiniteError:
                    self.metrics.nonfinite.inc()
                    raise
            self._record_step(outcome, epoch)
            step += 1
            run.step = step
            if self._tb is not None:
                self._tb.step(step, outcome)
            self._current_step = step
            if step % cfg.train.log_every_n_steps == 0 or step == batches.total_steps:
                memory = self._sample_memory()
                entry = {
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
                        k.split()[0]: (v["wait"] / v["total"] if v["total"] else 0.0)
                        for k, v in outcome.stage_timings.items()
                    },
                    "rss_bytes": memory,
                    "skipped": outcome.skipped,
                    "peak_gpu_memory_bytes": outcome.peak_gpu_memory_bytes,
                    "loss_scale": outcome.loss_scale,
                }
                self.history.append(entry)
                heads = " ".join(f"{h}={v:.4f}" for h, v in sorted(outcome.losses.items()))
                progress.message(
                    f"step {step}/{batches.total_steps} epoch {epoch} loss {outcome.total_loss:.4f} ({heads}) "
                    f"lr {lr:.2e} |g| {outcome.grad_norm:.3f} {outcome.seconds:.3f}s/step "
                    f"{entry['samples_per_second']:.1f} samples/s regret {outcome.regret_mean:.4f} "
                    f"rss {' '.join(f'{k}={v / 2**20:.0f}MiB' for k, v in memory.items())}"
                )
            progress.update(
                step, outcome.total_loss, outcome.samples / outcome.seconds if outcome.seconds else 0.0
            )
            end_of_epoch = step % batches.steps_per_epoch == 0
            if (
                end_of_epoch
                and cfg.train.eval_every_epoch
                and step < batches.total_steps
                and epoch not in evaluated_epochs
            ):
                with (
                    phase("Evaluate", step),
                    self._span("evaluation", step - 1),
                    progress.phase(f"evaluation after epoch {epoch}"),
                ):
                    entry = self._evaluate(driver, data, f"epoch {epoch}")
                entry["epoch"] = epoch
                self.validation.append(entry)
                if self._tb is not None:
                    self._tb.validation(entry)
                evaluated_epochs.add(epoch)
                progress.message(f"validation after epoch {epoch}: {_fmt_metrics(entry)}")
            every = cfg.checkpoint.save_checkpoint_every
            if every and step % every == 0 and step < batches.total_steps:
                t0 = time.perf_counter()
                with (
                    phase("SaveState", step),
                    self._span("checkpoint", step - 1),
                    progress.phase(f"checkpoint at step {step}"),
                ):
                    run.last_checkpoint = self._save_checkpoint(run_id, step, batches, driver, data)
                progress.message(
                    f"checkpoint at step {step}: {run.last_checkpoint} ({time.perf_counter() - t0:.2f}s)"
                )
            if self.stop_requested.is_set():
                run.stopped_early = step < batches.total_steps
                return

    def _final_evaluation(
        self, run: _Loop, driver: PipelineDriver, data: PreparedData, batches: StepBatches, progress: Progress
    ) -> None:
        """The final validation and the explanations file."""
        self._current_step = run.step
        with phase("Evaluate", run.step), progress.phase("final evaluation"):
            final = self._evaluate(
                driver, data, "final", explanations_path=self.output_dir / "explanations.jsonl"
            )
        final["epoch"] = batches.position(max(run.step - 1, 0))[0]
        self.validation.append(final)
        if self._tb is not None:
            self._tb.validation(final)
        progress.message(f"final validation: {_fmt_metrics(final)}")
        progress.summary(final)

    def _final_checkpoint(
        self, run: _Loop, run_id: str, driver: PipelineDriver, data: PreparedData, batches: StepBatches
    ) -> None:
        if run.last_checkpoint is None or ckpt.read_manifest(run.last_checkpoint).get("step") != run.step:
            with phase("SaveState", run.step), self._progress.phase(f"checkpoint at step {run.step}"):
                run.last_checkpoint = self._save_checkpoint(run_id, run.step, batches, driver, data)

    def _resume_info(self) -> ckpt.CheckpointInfo | None:
        if not self.resume:
            return None
        try:
            if self.resume is True or self.resume == "latest":
                info = ckpt.latest(self.checkpoint_root)
                if info is None:
                    raise RunError(f"--resume: no complete checkpoint under {self.checkpoint_root}")
            else:
                info = ckpt.resolve(Path(str(self.resume)))
        except ckpt.CheckpointError as exc:
            raise RunError(f"--resume: {exc}") from None
        saved_model = info.manifest.get("config", {}).get("model", {})
        if (
            self.config.model.gpu_layers_ratio == "auto"
            and self.config.model.cpu_layers is None
            and saved_model.get("cpu_layers") is not None
        ):
            # Keep the split the run was started with; re-measuring could choose another one.
            self.config = self.config.replace(**{"model.cpu_layers": saved_model["cpu_layers"]})
        if info.manifest.get("model_fingerprint") != self.config.model_fingerprint():
            theirs = info.manifest.get("config", {}).get("model", {})
            mine = self.config.to_dict()["model"]
            raise RunError(
                f"--resume: checkpoint {info.path} was trained with different model settings: "
                f"{'; '.join(diff_settings(mine, theirs)) or 'resolved shape differs'}"
            )
        return info

    def _resolve_split(self, resume_info) -> None:
        from orchestrator.autosplit import resolve_auto_split

        try:
            self.config, self.split_choice = resolve_auto_split(self.config)
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def _report(
        self,
        run_id,
        step,
        batches: StepBatches,
        data: PreparedData,
        counts,
        wall_start,
        last_checkpoint,
        stopped_early,
    ) -> dict:
        wall = time.time() - wall_start
        step_seconds = self.totals["step_seconds"] or 1e-9
        regret_steps = max(1, step)
        return {
            "run_id": run_id,
            "config": self.config.to_dict(),
            "parameters": {
                "cpu_stage": counts["cpu_stage"],
                "gpu_stage": counts["gpu_stage"],
                "total": counts["total"],
            },
            "stages": {
                n: {
                    "address": self.addresses[n],
                    "device": i.device,
                    "layers": i.layer_range,
                    "parameters": i.num_parameters,
                    "device_name": i.device_name,
                    "compute_capability": i.compute_capability,
                    "memory_budget_bytes": i.memory_budget_bytes,
                    "device_total_memory_bytes": i.total_memory_bytes,
                }
                for n, i in self.stage_info.items()
            },
            "steps": step,
            "total_steps": batches.total_steps,
            "steps_per_epoch": batches.steps_per_epoch,
            "epochs": step / batches.steps_per_epoch,
            "stopped_early": stopped_early,
            "wall_seconds": wall,
            "train_seconds": self.totals["step_seconds"],
            "samples": self.totals["samples"],
            "tokens": self.totals["tokens"],
            "samples_per_second": self.totals["samples"] / step_seconds,
            "tokens_per_second": self.totals["tokens"] / step_seconds,
            "skipped_steps": self.totals["skipped_steps"],
            "loss_history": self.history,
            "validation": self.validation,
            "final_validation": self.validation[-1] if self.validation else None,
            "regret": {
                "computations": self.totals["regret_computations"],
                "bentham_evaluations": self.totals["bentham_evaluations"],
                "computations_per_scenario": self.totals["regret_computations"]
                / max(1, self.totals["samples"]),
                "bentham_evaluations_per_scenario": self.totals["bentham_evaluations"]
                / max(1, self.totals["samples"]),
                "computations_per_step": self.totals["regret_computations"] / regret_steps,
                "mean_regret": self.regret_sum / self.regret_n if self.regret_n else 0.0,
                "explanations": str(self.output_dir / "explanations.jsonl"),
            },
            "peak_rss_bytes": self.peak_rss,
            "peak_gpu_memory_bytes": max([h.get("peak_gpu_memory_bytes", 0) for h in self.history] or [0]),
            "precision": {
                n: {"used": c.precision, "reason": c.precision_reason} for n, c in self.clients.items()
            },
            "loss_scale": self._loss_scale_state,
            "restarts": self.restarts,
            "recoveries": self.recoveries,
            "data": data.summary(),
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "init_from": self.init_spec,
            "split": {
                "cpu_layers": resolve_model_shape(self.config.model).cpu_layers,
                "automatic": self.split_choice is not None,
                "reason": self.split_choice.reason
                if self.split_choice is not None
                else "model.gpu_layers_ratio / model.cpu_layers",
                "predicted_step_seconds": self.split_choice.predicted_step_seconds
                if self.split_choice is not None
                else None,
            },
        }


def _fmt_metrics(entry: dict) -> str:
    m, b = entry["metrics"], entry["baseline"]
    parts = []
    for key in ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae"):
        if key in m:
            bow = f", bag-of-words {b['baseline_bow_' + key]:.4f}" if "baseline_bow_" + key in b else ""
            parts.append(f"{key} {m[key]:.4f} (baseline {b.get('baseline_' + key, float('nan')):.4f}{bow})")
    return ", ".join(parts)
