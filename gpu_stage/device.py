"""The GPU stage's device: what the card is and has free, and the stage's own memory cap.

Also a probe the orchestrator's pre-flight check runs as a subprocess, so that the orchestrator
never holds a CUDA context (hundreds of MiB on the card for the whole run)::

    python -m gpu_stage.device --device cuda:1     # one JSON line: name, capability, free, total
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from typing import Any

import torch

from redheart.gpu_memory import (
    GiB,
    allocator_fraction,
    check_device_budget,
    describe_estimate,
    stage_estimates,
)
from redheart.model import CUDA_CONTEXT_BYTES, resolve_model_shape

log = logging.getLogger(__name__)


def device_facts(device: torch.device) -> dict[str, Any]:
    """Name, compute capability and memory of ``device`` (creates this process's CUDA context)."""
    if device.type != "cuda":
        return {"device": str(device), "name": "cpu", "capability": "", "free_bytes": 0, "total_bytes": 0}
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "device": f"cuda:{index}",
        "name": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "free_bytes": int(free),
        "total_bytes": int(total),
    }


def probe(device: str, timeout: float = 120.0) -> dict[str, Any]:
    """``device_facts`` read in a child process; raises RuntimeError naming the device when it fails."""
    cmd = [sys.executable, "-m", "gpu_stage.device", "--device", device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the probe of {device} did not answer within {timeout:.0f}s") from None
    if out.returncode != 0:
        raise RuntimeError(f"the probe of {device} failed: {(out.stderr or out.stdout).strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def enforce_budget(config, device: torch.device) -> dict[str, Any]:
    """At stage start on CUDA: refuse a budget the card cannot give, then cap this process to it.

    Returns the device facts with the enforced ``budget_bytes`` (0 when not capped). Raises
    RuntimeError with the numbers and the fix."""
    facts = device_facts(device)
    facts["budget_bytes"] = 0
    if device.type != "cuda":
        return facts
    shape = resolve_model_shape(config.model)
    est = stage_estimates(config, shape, gpu_on_cuda=True)["gpu"]
    budget = int(config.gpu_stage.gpu_memory_gb * GiB)
    label = f"{facts['device']} ({facts['name']})"
    # This process's context already exists and is outside `free`: compare the rest of the estimate.
    need = est["total"] - est["cuda_context"]
    problems = [
        f
        for f in check_device_budget(budget, need, facts["free_bytes"], facts["total_bytes"], label)
        if not f.ok and f.fatal
    ]
    if problems:
        raise RuntimeError(
            "; ".join(f"{f.what} (fix: {f.fix})" for f in problems) + f"; estimate {describe_estimate(est)}"
        )
    if config.gpu_stage.enforce_memory_budget:
        fraction = allocator_fraction(budget, facts["total_bytes"], CUDA_CONTEXT_BYTES)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        facts["budget_bytes"] = budget
        log.info(
            "gpu stage: %s capped at %.2f of %.2f GiB (gpu_memory_gb %g; fraction %.3f); estimate %s",
            label,
            fraction * facts["total_bytes"] / GiB,
            facts["total_bytes"] / GiB,
            config.gpu_stage.gpu_memory_gb,
            fraction,
            describe_estimate(est),
        )
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print one JSON line describing a CUDA device.")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"CUDA is not available in this process (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    try:
        device = torch.device(args.device)
        print(json.dumps(device_facts(device)))
    except (RuntimeError, ValueError, AssertionError) as exc:
        print(f"{args.device}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
