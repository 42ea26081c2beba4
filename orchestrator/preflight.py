"""Pre-flight check (``--check``, and at the start of every run): will this run succeed here?

Checks, each printed with its fix when it fails:

* CUDA and a driver when the GPU stage asks for ``cuda`` (local launch);
* memory: each stage's training-memory estimate (weights, gradients, AdamW state, activations of
  the micro-batches 1F1B keeps in flight) against ``gpu_memory_gb`` / ``cpu_memory_gb`` and the
  host's free memory;
* free disk for the checkpoints the run keeps;
* the output directory not held by another live run (lock file);
* ports free (local, fixed ports) or services reachable (remote);
* an estimate of steps per epoch and of the total time.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from orchestrator.stages import stage_specs
from redheart.config import HybridConfig
from redheart.config.endpoints import split_address
from redheart.gpu_memory import check_device_budget, describe_estimate, stage_estimates
from redheart.model import count_parameters, resolve_model_shape

GiB = 1024**3


@dataclass
class Finding:
    ok: bool
    what: str
    fix: str = ""
    fatal: bool = True


@dataclass
class PreflightReport:
    findings: list[Finding] = field(default_factory=list)
    estimates: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok or not f.fatal for f in self.findings)

    def add(self, ok: bool, what: str, fix: str = "", fatal: bool = True) -> None:
        self.findings.append(Finding(ok, what, fix, fatal))


def _count_lines(path: Path, cap: int = 10_000_000) -> int:
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
                if n >= cap:
                    break
    return n


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _reachable(address: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(split_address(address), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _measured_gflops() -> float:
    """A quick matmul to estimate this host's fp32 speed (for the time estimate only)."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    a @ b
    start = time.perf_counter()
    reps = 8
    for _ in range(reps):
        a @ b
    seconds = time.perf_counter() - start
    return 2 * 512**3 * reps / seconds / 1e9


def preflight(
    config: HybridConfig, out=sys.stdout, quiet_when_ok: bool = False, resume: bool = False
) -> PreflightReport:
    report = PreflightReport()
    cfg = config
    shape = resolve_model_shape(cfg.model)
    counts = count_parameters(shape)
    local = cfg.launch.mode == "local"
    on_cuda, facts = _check_devices(cfg, report, local)
    _check_memory(cfg, report, shape, on_cuda, facts, local)
    _check_disk(cfg, report, counts)
    _check_output_lock(cfg, report)
    _check_services(cfg, report, local)
    _check_data_and_time(cfg, report, shape, counts)
    _print_report(report, out, quiet_when_ok)
    return report


def _check_devices(cfg: HybridConfig, report: PreflightReport, local: bool):
    """The GPU stage's device, read by a probe subprocess (this process must never hold a CUDA
    context); returns (GPU stage on CUDA, the probe's facts or None)."""
    device = cfg.gpu_stage.device
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    facts = None
    if local and on_cuda:
        target = "cuda" if device == "auto" else device
        try:
            from gpu_stage.device import probe

            facts = probe(target)
            report.add(
                True,
                f"CUDA for gpu_stage.device = {device!r}: {facts['device']} ({facts['name']}, compute capability "
                f"{facts['capability']}, {facts['free_bytes'] / GiB:.2f} of {facts['total_bytes'] / GiB:.2f} GiB free)",
            )
        except (RuntimeError, ValueError, OSError) as exc:
            report.add(
                False,
                f"CUDA for gpu_stage.device = {device!r}: not usable: {exc}",
                "install an NVIDIA driver and a CUDA build of torch, check the device index, "
                'or set gpu_stage.device = "auto" / "cpu"',
            )
    report.estimates["gpu_device"] = facts
    return on_cuda, facts


def _check_memory(
    cfg: HybridConfig, report: PreflightReport, shape, on_cuda: bool, facts, local: bool
) -> None:
    """Memory budgets (1F1B keeps at most p - rank micro-batches in flight)."""
    est = stage_estimates(cfg, shape, gpu_on_cuda=on_cuda)
    report.estimates["memory_bytes"] = {s: e["total"] for s, e in est.items()}
    report.estimates["memory_detail"] = est
    if on_cuda:
        label = f"{facts['device']} ({facts['name']})" if facts else cfg.gpu_stage.device
        findings = check_device_budget(
            int(cfg.gpu_stage.gpu_memory_gb * GiB),
            est["gpu"]["total"],
            facts["free_bytes"] if facts else None,
            facts["total_bytes"] if facts else None,
            label,
        )
        first = findings[0]
        report.add(
            first.ok,
            f"GPU stage memory estimate {describe_estimate(est['gpu'])} vs gpu_memory_gb = "
            f"{cfg.gpu_stage.gpu_memory_gb}",
            first.fix,
            first.fatal,
        )
        for f in findings[1:]:
            report.add(f.ok, f.what, f.fix, f.fatal)
    host_need = est["cpu"]["total"] + (0 if on_cuda else est["gpu"]["total"])
    gpu_on_host = "" if on_cuda else f", gpu stage on CPU {est['gpu']['total'] / GiB:.2f}"
    report.add(
        host_need <= cfg.cpu_stage.cpu_memory_gb * GiB,
        f"host memory estimate {host_need / GiB:.2f} GiB (cpu stage {est['cpu']['total'] / GiB:.2f}{gpu_on_host}) "
        f"vs cpu_memory_gb = {cfg.cpu_stage.cpu_memory_gb}",
        "a smaller model or micro_batch_size, activation checkpointing, or raise cpu_stage.cpu_memory_gb",
    )
    if local:
        available = psutil.virtual_memory().available
        report.add(
            host_need <= available,
            f"this host has {available / GiB:.1f} GiB available for an estimated {host_need / GiB:.2f} GiB",
            'free memory, or run the stages on separate hosts (launch.mode = "remote")',
        )


def _check_disk(cfg: HybridConfig, report: PreflightReport, counts) -> None:
    """Disk for the checkpoints kept."""
    ckpt_dir = cfg.checkpoint_dir()
    probe = ckpt_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    per_ckpt = counts["total"] * 4 * 3 + 1_000_000  # weights + two AdamW moments
    need_disk = per_ckpt * (cfg.checkpoint.keep_last + 1)
    report.estimates["checkpoint_bytes"] = per_ckpt
    report.add(
        need_disk <= free,
        f"disk: {cfg.checkpoint.keep_last} + 1 checkpoints x {per_ckpt / 2**20:.1f} MiB = "
        f"{need_disk / 2**20:.1f} MiB needed, {free / 2**30:.1f} GiB free at {probe}",
        "free disk, lower checkpoint.keep_last, or point checkpoint.directory elsewhere",
    )


def _check_output_lock(cfg: HybridConfig, report: PreflightReport) -> None:
    """The output directory is not held by a running run."""
    from orchestrator.run_dir import OutputLock

    holder = OutputLock(cfg.output_dir()).holder()
    report.add(
        holder is None,
        f"output directory {cfg.output_dir()}: "
        + (f"held by running process {holder}" if holder else "free"),
        "wait for that run to finish, stop it, or pass another --output-dir",
    )


def _check_services(cfg: HybridConfig, report: PreflightReport, local: bool) -> None:
    """Local: the fixed ports are free; remote: every service is reachable."""
    if local:
        if cfg.launch.ports == "fixed":
            for name, port in (
                ("cpu_stage.port", cfg.cpu_stage.port),
                ("gpu_stage.port", cfg.gpu_stage.port),
                ("regret.port", cfg.regret.port if cfg.regret.enabled else 0),
                ("orchestrator.metrics_port", cfg.orchestrator.metrics_port if cfg.metrics.enabled else 0),
            ):
                if port:
                    report.add(
                        _port_free("127.0.0.1", port),
                        f"port {port} ({name}) " + ("free" if _port_free("127.0.0.1", port) else "in use"),
                        f'stop what uses it, choose another {name}, or set launch.ports = "auto"',
                    )
        else:
            report.add(True, 'ports: chosen automatically on loopback (launch.ports = "auto")', fatal=False)
    else:
        addresses = {s.name: s.address(cfg) for s in stage_specs(cfg)}
        if cfg.regret.enabled and cfg.regret.address != "inprocess":
            addresses["regret"] = cfg.regret_address()
        for name, address in addresses.items():
            ok = _reachable(address)
            report.add(
                ok,
                f"{name} at {address}: " + ("reachable" if ok else "not reachable"),
                f"start it (`redheart-{name.replace('_', '-')} --config ...`) or fix {name}.address",
            )


def _check_data_and_time(cfg: HybridConfig, report: PreflightReport, shape, counts) -> None:
    """The data's size, the steps it makes, and a time estimate."""
    t = cfg.train
    data_path = Path(cfg.data.path)
    if data_path.exists():
        rows = _count_lines(data_path)
        source = f"{rows} scenarios in {data_path}"
    elif cfg.data.generate_if_missing:
        rows = cfg.data.generated_count
        source = f"{rows} scenarios to be generated into {data_path}"
    else:
        rows = 0
        report.add(
            False,
            f"data.path {data_path} does not exist",
            "point data.path at your JSONL or set data.generate_if_missing = true",
        )
        source = "no data"
    if cfg.data.max_scenarios:
        rows = min(rows, cfg.data.max_scenarios)
    train_rows = int(rows * (1 - cfg.data.validation_fraction))
    per_step = t.batch_size * t.gradient_accumulation_steps
    steps_per_epoch = train_rows // per_step if per_step else 0
    total = steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    if rows:
        report.add(
            steps_per_epoch >= 1,
            f"data: {source}; ~{train_rows} for training -> {steps_per_epoch} steps per epoch, {total} steps",
            "more data or a smaller batch_size",
        )
    gflops = _measured_gflops()
    tokens_per_step = per_step * shape.max_seq_len
    # 6 N flops per token for forward + backward; the stages overlap, so the slower one bounds.
    step_seconds = 6 * counts["total"] * tokens_per_step / (gflops * 1e9)
    report.estimates.update(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        step_seconds=step_seconds,
        total_seconds=step_seconds * total,
    )
    report.add(
        True,
        f"estimate: ~{step_seconds:.2f} s/step at {gflops:.0f} GFLOP/s measured here (upper bound at max_seq_len), "
        f"~{step_seconds * total / 60:.1f} min for {total} steps",
        fatal=False,
    )


def _print_report(report: PreflightReport, out, quiet_when_ok: bool) -> None:
    """The findings, unless everything passed and the caller wants quiet."""
    failed = [f for f in report.findings if not f.ok and f.fatal]
    if not (quiet_when_ok and not failed):
        print(f"pre-flight check ({'OK' if not failed else f'{len(failed)} problem(s)'}):", file=out)
        for f in report.findings:
            mark = "ok " if f.ok else ("ERR" if f.fatal else "warn")
            print(f"  [{mark}] {f.what}", file=out)
            if not f.ok and f.fix:
                print(f"        fix: {f.fix}", file=out)
