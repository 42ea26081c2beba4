"""HybridDistributedTrainer: a whole training run across the CPU stage, the GPU stage and the
regret service, as the original prototype promised::

    report, checkpoint = HybridDistributedTrainer(HybridConfig(...)).train()

One run: prepare data and tokenizer -> start (local) or reach (remote) the services -> handshake
(model fingerprints must agree) -> start or resume the run -> optimizer steps with logging,
evaluation and coordinated checkpoints -> final evaluation, explanations, report.json, loss.png.
A service that dies mid-step aborts that step on every stage; the run then recovers from the last
complete checkpoint (restarting the service itself in local mode) and goes on.

Where the pieces live: the services in :mod:`orchestrator.service_set`, the learning rate in
:mod:`orchestrator.lr_schedule`, validation in :mod:`orchestrator.evaluation`, report.json,
loss.png and explanations in :mod:`orchestrator.report`, the output directory's lock, signals and
metrics endpoint in :mod:`orchestrator.run_dir`, recovery in :mod:`orchestrator.recovery`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from orchestrator import checkpoint as ckpt
from orchestrator import evaluation, report, run_checkpoints, run_dir, run_products
from orchestrator.data import PreparedData, StepBatches, prepare_data
from orchestrator.lr_schedule import learning_rate_at
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.pipeline import DynamicLossScale, NonFiniteError, PipelineDriver, StepOutcome
from orchestrator.progress import Progress
from orchestrator.recovery import PhaseFailed, Recovery, RecoveryStopped, phase
from orchestrator.run_dir import OutputLock
from orchestrator.service_set import RunError, ServiceSet
from orchestrator.stages import stage_specs
from orchestrator.tally import RunTally
from orchestrator.trace import TraceRecorder
from redheart.config import HybridConfig
from redheart.model import count_parameters, resolve_model_shape
from redheart.precision import CPU_BF16_WARNING

# Older import paths: `from orchestrator.trainer import RunError, OutputLock, learning_rate_at, _fmt_metrics`.
_fmt_metrics = report.fmt_metrics
__all__ = ["HybridDistributedTrainer", "OutputLock", "RunError", "learning_rate_at"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Loop:
    """Where the training loop stands; a recovery rewinds `step` to the last checkpoint."""

    step: int | None = None  # steps completed; None until the stages were started
    last_checkpoint: Path | None = None
    stopped_early: bool = False


@dataclasses.dataclass
class _Run:
    """What every phase of one run needs, built once the services are up."""

    run_id: str
    driver: PipelineDriver
    data: PreparedData
    batches: StepBatches
    progress: Progress
    counts: dict[str, int]


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
        self.metrics = OrchestratorMetrics(self.registry, stage_specs(config))
        self.resume = resume
        self.config_path = config_path
        self.output_dir = config.output_dir()
        self.checkpoint_root = config.checkpoint_dir()
        self.services: ServiceSet | None = None  # built when the config is final (split resolved)
        self.restarts: dict[str, int] = {**{s.name: 0 for s in stage_specs(config)}, "regret": 0}
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
        self._current_step = 0

    def _reset_progress(self) -> None:
        """What a run has done so far: empty at the start, and again when a recovery finds no checkpoint."""
        self.tally = RunTally()

    # ------------------------------------------------------------------ the run

    def train(self) -> tuple[dict[str, Any], Path]:
        wall_start = time.time()
        self._current_step = 0
        with ExitStack() as stack:
            resume_info = self._set_up(stack)
            data = self._prepare_data(resume_info)
            batches = StepBatches(self.config, data.train)
            self.metrics_port = run_dir.start_metrics(self.config, self.registry, stack)
            self.open_services(stack)
            run = self._build_run(stack, resume_info, data, batches)
            loop = _Loop(last_checkpoint=resume_info.path if resume_info is not None else None)
            self._run_with_recovery(loop, run, resume_info)
            return self._finish(loop, run, wall_start)

    def _set_up(self, stack: ExitStack) -> ckpt.CheckpointInfo | None:
        """Settle the config (resume, split, init_from) and take the output directory."""
        resume_info = self._resume_info()
        self.resolve_split()
        self.init_spec = self._check_init_from()
        run_dir.prepare_output(self.config, self.output_dir, stack)
        self._tb = run_dir.open_tensorboard(self.config, self.output_dir, stack)
        run_dir.install_stop_handlers(self.stop_requested, stack)
        return resume_info

    def _prepare_data(self, resume_info: ckpt.CheckpointInfo | None) -> PreparedData:
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
        data = prepare_data(self.config, self.output_dir, tokenizer_path=tokenizer_path)
        if resume_info is not None and data.tokenizer_sha256 != resume_info.manifest.get("tokenizer_sha256"):
            raise RunError(
                f"tokenizer {data.tokenizer_path} differs from the one checkpoint {resume_info.path} "
                f"was trained with"
            )
        return data

    def open_services(self, stack: ExitStack) -> ServiceSet:
        """Launch or reach the services of this (final) config, connect and handshake them."""
        self.services = ServiceSet(self.config, self.output_dir, self.stop_requested)
        self.services.trace = self.trace
        self.services.open(stack)
        self.services.handshake()
        return self.services

    def _build_run(self, stack: ExitStack, resume_info, data: PreparedData, batches: StepBatches) -> _Run:
        cfg = self.config
        counts = count_parameters(resolve_model_shape(cfg.model))
        run_id = resume_info.manifest["run_id"] if resume_info is not None else f"run-{uuid.uuid4().hex[:12]}"
        # Loss scaling is switched on after StartRun, when the stages have said their precision.
        driver = PipelineDriver(
            [self.services.clients[s.name] for s in self.services.stages],
            cfg,
            run_id,
            fp16_loss_scaling=False,
            lookahead=self.services.regret_lookahead(),
            dead_services=self.services.dead_services(),
        )
        stack.callback(driver.close)
        self._last_info = resume_info
        report.log_run(run_id, counts, data, batches, self.services, cfg)
        progress = self._progress = Progress(batches.total_steps, cfg.orchestrator.progress)
        stack.callback(progress.close)
        return _Run(run_id, driver, data, batches, progress, counts)

    def _run_with_recovery(self, loop: _Loop, run: _Run, resume_info) -> None:
        """The one recovery loop: a phase that fails on a fault (a killed or unreachable service)
        ends up here, and the run goes on from the last complete checkpoint."""
        s = self.services
        recovery = Recovery(
            self.config,
            s.launcher,
            s.addresses,
            s.clients,
            self.restarts,
            self.recoveries,
            self.stop_requested,
            restore=lambda: self._restore_last(run.run_id, run.driver),
            on_restart=lambda name: self.metrics.restarts.labels(name).inc(),
        )
        while True:
            try:
                if loop.step is None:
                    loop.step = self._begin(run.run_id, resume_info, run.driver)
                self._train_steps(loop, run)
                self._final_evaluation(loop, run)
                self._final_checkpoint(loop, run)
                return
            except PhaseFailed as failure:
                try:
                    loop.step = recovery.recover(failure)
                except RecoveryStopped as exc:
                    raise RunError(f"{failure}; {exc}") from None
                loop.last_checkpoint = self._last_info.path if self._last_info is not None else None

    def _finish(self, loop: _Loop, run: _Run, wall_start: float) -> tuple[dict[str, Any], Path]:
        """report.json, loss.png and the trace files of a finished (or stopped) run."""
        self._current_step = loop.step
        self._sample_memory()
        self._loss_scale_state = run.driver.scaler.state()
        result = report.build_report(
            self,
            run.run_id,
            loop.step,
            run.batches,
            run.data,
            run.counts,
            wall_start,
            loop.last_checkpoint,
            loop.stopped_early,
        )
        result["trace"] = report.write_trace(self.trace, self.output_dir)
        report.write_products(result, self.output_dir, self.tally.history, self.tally.validation)
        return result, loop.last_checkpoint

    # ------------------------------------------------------------------ the phases of a run

    def _begin(self, run_id: str, resume_info: ckpt.CheckpointInfo | None, driver: PipelineDriver) -> int:
        step = resume_info.step if resume_info is not None else 0
        with phase("StartRun", step):
            if resume_info is not None and self.services.launcher is None:
                self.services.take_over(run_id)
            step = self.services.restore(run_id, resume_info, self.init_spec)
        for s in self.services.stages:
            c = self.services.clients[s.name]
            emulated = CPU_BF16_WARNING in c.precision_reason  # slow here: say it where the user looks
            (log.warning if emulated else log.info)(
                "%s trains in %s: %s", s.name, c.precision, c.precision_reason
            )
        self._set_loss_scaling(driver)
        if resume_info is not None:
            self._restore_orchestrator_state(resume_info.manifest, driver)
            log.info("resumed run %s at step %d from %s", run_id, step, resume_info.path)
        return step

    def _set_loss_scaling(self, driver: PipelineDriver) -> None:
        """Each stage chose its precision from its own device at StartRun; fp16 on either needs the scale."""
        fp16 = self.services.precisions_fp16()
        if driver.scaler.enabled != fp16:
            t = self.config.train
            driver.scaler = DynamicLossScale(
                fp16, init_scale=t.initial_loss_scale, max_consecutive_skips=t.max_consecutive_skips
            )

    def _train_steps(self, loop: _Loop, run: _Run) -> None:
        """Optimizer steps with logging, epoch-end evaluation and checkpoints, until the last step or a stop."""
        evaluated_epochs = {v.get("epoch") for v in self.tally.validation}
        total = run.batches.total_steps
        while loop.step < total:
            epoch, _ = run.batches.position(loop.step)
            outcome, lr = self._train_step(loop, run, epoch)
            step = loop.step
            self._log_step(run, step, epoch, lr, outcome)
            end_of_epoch = step % run.batches.steps_per_epoch == 0
            if self._should_evaluate(end_of_epoch, step, total, epoch, evaluated_epochs):
                self._epoch_evaluation(run, step, epoch)
                evaluated_epochs.add(epoch)
            every = self.config.checkpoint.save_checkpoint_every
            if every and step % every == 0 and step < total:
                self._periodic_checkpoint(loop, run, step)
            if self.stop_requested.is_set():
                loop.stopped_early = step < total
                return

    def _train_step(self, loop: _Loop, run: _Run, epoch: int) -> tuple[StepOutcome, float]:
        """One optimizer step through the pipeline; `loop.step` moves on when it is done."""
        step = loop.step
        self._current_step = step
        lr = learning_rate_at(step, run.batches.total_steps, self.config.train)
        with phase("RunStep", step), self._span(f"step {step + 1}", step):
            try:
                outcome = run.driver.run_step(step, run.batches.rounds(step), lr)
            except NonFiniteError:
                self.metrics.nonfinite.inc()
                raise
        self._record_step(outcome, epoch)
        loop.step = step + 1
        if self._tb is not None:
            self._tb.step(loop.step, outcome)
        self._current_step = loop.step
        return outcome, lr

    def _log_step(self, run: _Run, step: int, epoch: int, lr: float, outcome: StepOutcome) -> None:
        """Every log_every_n_steps (and the last): a history entry and a progress line."""
        total = run.batches.total_steps
        if step % self.config.train.log_every_n_steps == 0 or step == total:
            entry = report.step_entry(step, epoch, lr, outcome, self._sample_memory())
            self.tally.history.append(entry)
            run.progress.message(report.step_line(entry, total, outcome))
        run.progress.update(
            step, outcome.total_loss, outcome.samples / outcome.seconds if outcome.seconds else 0.0
        )

    def _should_evaluate(self, end_of_epoch: bool, step: int, total: int, epoch: int, done: set) -> bool:
        """Epoch-end validation; the last epoch's is the final evaluation, a resumed one is not repeated."""
        return end_of_epoch and self.config.train.eval_every_epoch and step < total and epoch not in done

    def _epoch_evaluation(self, run: _Run, step: int, epoch: int) -> None:
        with (
            phase("Evaluate", step),
            self._span("evaluation", step - 1),
            run.progress.phase(f"evaluation after epoch {epoch}"),
        ):
            entry = self._evaluate(run.driver, run.data, f"epoch {epoch}")
        entry["epoch"] = epoch
        self.tally.validation.append(entry)
        if self._tb is not None:
            self._tb.validation(entry)
        run.progress.message(f"validation after epoch {epoch}: {report.fmt_metrics(entry)}")

    def _periodic_checkpoint(self, loop: _Loop, run: _Run, step: int) -> None:
        t0 = time.perf_counter()
        with (
            phase("SaveState", step),
            self._span("checkpoint", step - 1),
            run.progress.phase(f"checkpoint at step {step}"),
        ):
            loop.last_checkpoint = self._save_checkpoint(run.run_id, step, run.batches, run.driver, run.data)
        run.progress.message(
            f"checkpoint at step {step}: {loop.last_checkpoint} ({time.perf_counter() - t0:.2f}s)"
        )

    def _final_evaluation(self, loop: _Loop, run: _Run) -> None:
        """The final validation and the explanations file."""
        self._current_step = loop.step
        with phase("Evaluate", loop.step), run.progress.phase("final evaluation"):
            final = self._evaluate(
                run.driver, run.data, "final", explanations_path=self.output_dir / "explanations.jsonl"
            )
        final["epoch"] = run.batches.position(max(loop.step - 1, 0))[0]
        self.tally.validation.append(final)
        if self._tb is not None:
            self._tb.validation(final)
        run.progress.message(f"final validation: {report.fmt_metrics(final)}")
        run.progress.summary(final)

    def _final_checkpoint(self, loop: _Loop, run: _Run) -> None:
        if loop.last_checkpoint is None or ckpt.read_manifest(loop.last_checkpoint).get("step") != loop.step:
            with phase("SaveState", loop.step), run.progress.phase(f"checkpoint at step {loop.step}"):
                loop.last_checkpoint = self._save_checkpoint(
                    run.run_id, loop.step, run.batches, run.driver, run.data
                )

    def _span(self, name: str, step: int):
        """An orchestrator span for the trace (0-based `step`); nothing without --trace."""
        return self.trace.span(name, step) if self.trace is not None else contextlib.nullcontext()

    def _evaluate(
        self, driver: PipelineDriver, data: PreparedData, label: str, explanations_path: Path | None = None
    ) -> dict[str, Any]:
        return evaluation.evaluate(
            self.config,
            driver,
            data,
            label=label,
            step=self._current_step,
            bow=self._bow_baseline(data),
            regret_mean=self.tally.regret_mean(),
            metrics=self.metrics,
            progress=self._progress,
            explanations_path=explanations_path,
        )

    def _record_step(self, outcome: StepOutcome, epoch: int) -> None:
        self.metrics.observe_step(outcome)
        self.metrics.epoch.set(epoch)
        self.metrics.step.set(outcome.step + 1)
        self.tally.record(outcome)

    def _sample_memory(self) -> dict[str, int]:
        launcher = self.services.launcher if self.services is not None else None
        return run_dir.sample_memory(launcher, self.peak_rss)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(
        self, run_id: str, step: int, batches: StepBatches, driver: PipelineDriver, data: PreparedData
    ) -> Path:
        start = time.perf_counter()
        directory = ckpt.step_dir(self.checkpoint_root, step)
        if directory.exists():
            shutil.rmtree(directory)  # a leftover of an interrupted save: redo it
        directory.mkdir(parents=True)
        shards = self.services.save(run_id, step, directory)
        manifest = run_checkpoints.manifest(self, run_id, step, batches, driver, data, shards)
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
        mean = self.tally.regret_mean()
        return run_products.write_baselines(directory, data, self._bow_baseline(data), mean)

    def _check_init_from(self) -> dict[str, str] | None:
        try:
            return run_products.check_init_from(self.config)
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def _restore_orchestrator_state(self, manifest: dict[str, Any], driver: PipelineDriver | None) -> None:
        self.tally.load(manifest)
        for k, v in manifest.get("restarts", {}).items():
            self.restarts[k] = max(self.restarts.get(k, 0), int(v))
        if driver is not None:
            driver.scaler.load(manifest.get("loss_scale", {}))

    # ------------------------------------------------------------------ recovery

    def _restore_last(self, run_id: str, driver: PipelineDriver) -> int:
        """Recovery's restore: every stage and the orchestrator's own state back at the last
        complete checkpoint of this run (the initial weights when there is none)."""
        info = self._last_complete(run_id)
        step = self.services.restore(run_id, info, self.init_spec)
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
        return run_checkpoints.last_complete(self._last_info, self.checkpoint_root, run_id)

    # ------------------------------------------------------------------ the config of a run

    def _resume_info(self) -> ckpt.CheckpointInfo | None:
        info, self.config = run_checkpoints.resume_point(self.resume, self.checkpoint_root, self.config)
        return info

    def resolve_split(self) -> None:
        """model.gpu_layers_ratio = "auto": measure and choose the split (self.config then has it)."""
        from orchestrator.autosplit import resolve_auto_split

        try:
            self.config, self.split_choice = resolve_auto_split(self.config)
        except ValueError as exc:
            raise RunError(str(exc)) from None
