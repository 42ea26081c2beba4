"""Regret service throughput with 1, 2 and 4 worker processes, side by side in one run.

    python benchmarks/regret_workers.py [--batch 20000] [--calls 10] [--rounds 2] [--warmup 2] [--workers 1,2,4]
                                        [--out benchmarks/results/regret_workers.json]

For each worker count the benchmark starts the real service as its own process
(``python -m regret_service.cli`` on a free port, as a user would run it) and waits for its READY
line; idle services cost nothing, so all run at once. Each service gets ``calls`` timed Score calls of
``batch`` scenarios through :class:`redheart.regret_client.RegretClient`, back to back in ``rounds``
blocks (sustained throughput), each block after ``warmup`` untimed calls; the blocks alternate
between the services (1, 2, 4, 1, 2, 4) so a change of load on the machine hits every row alike. Every answer must be bit-identical to
:func:`redheart.calculus.score` on the same batch. The services stop with SIGTERM. The client runs in
this process; the services and their workers in theirs, as in training.

Reported: scored scenarios per second (from the median call, and overall), the ratio to 1 worker,
the workers' busy seconds per call from the service's /metrics, and the best call (least disturbed
by other load) with its ratio. Absolute numbers depend on the machine; compare only the rows of
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _start_service(workers: int, batch: int, tmp: Path) -> tuple[subprocess.Popen, int, int]:
    """Start ``python -m regret_service.cli`` with ``workers`` workers; return (process, port, metrics port)."""
    config = tmp / f"regret_{workers}.toml"
    config.write_text(
        f"[regret]\nnum_workers = {workers}\nmax_batch = {max(batch, 4096)}\nport = 0\n"
        f"[wire]\nmax_message_mb = {max(64, batch * 64 // (1 << 20) + 16)}\n",
        encoding="utf-8",
    )
    # The services read only this file: no REDHEART_* overrides (a token, ports) from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDHEART_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "regret_service.cli",
            "--config",
            str(config),
            "--metrics-port",
            "0",
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.match(r"REDHEART_READY service=regret port=(\d+) metrics_port=(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the regret service did not start: {line!r} {proc.stderr.read()}")
    return proc, int(match.group(1)), int(match.group(2))


def machine_idle_percent(seconds: float = 1.0) -> float | None:
    """Share of all CPUs idle over ``seconds`` (Linux /proc/stat): other load skews the comparison."""

    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values[:8])  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return None
    return 100.0 * (idle1 - idle0) / max(1, total1 - total0)


def _busy_seconds(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^redheart_regret_worker_busy_seconds_total\{[^}]*\} (\S+)$", text, re.M)
    )


# long: the services, the alternating timed blocks and their clean-up share state; kept together so the
# timed loop reads whole
def run(workers_list: list[int], batch: int, calls: int, warmup: int, rounds: int = 2) -> dict:
    import numpy as np
    import torch

    from redheart import calculus
    from redheart.regret_client import RegretClient

    rng = np.random.default_rng(0)
    x = rng.random((batch, 8), dtype=np.float32)
    x[:, 7] = x[:, 7] * 2 - 1  # valence in [-1, 1]
    tensor = torch.from_numpy(x)
    reference = calculus.score(x)
    rows = []
    idle_before = machine_idle_percent()
    message_mb = max(64, batch * 64 // (1 << 20) + 16)
    with tempfile.TemporaryDirectory() as tmp:
        services = []
        try:
            for workers in workers_list:
                services.append((workers, *_start_service(workers, batch, Path(tmp))))
            clients = [
                RegretClient(f"127.0.0.1:{port}", max_message_mb=message_mb, timeout_seconds=120)
                for _w, _proc, port, _m in services
            ]
            busy0 = [_busy_seconds(m) for _w, _p, _port, m in services]
            seconds: list[list[float]] = [[] for _ in services]
            warm_seconds = [0.0 for _ in services]
            # Blocks of back-to-back calls per worker count (sustained throughput), the blocks
            # alternating over `rounds` rounds (1, 2, 4, 1, 2, 4): a change of load on the machine
            # during the run hits every worker count alike instead of skewing one row.
            per_block = [calls // rounds + (1 if r < calls % rounds else 0) for r in range(rounds)]
            for r, block in enumerate(per_block):
                for k, (client, (workers, _proc, _port, _m)) in enumerate(zip(clients, services)):
                    start = time.perf_counter()
                    for i in range(warmup):  # re-warm the workers after the other services' block
                        client.score("bench-warmup", workers, r * 100 + i, tensor)
                    warm_seconds[k] += time.perf_counter() - start
                    for i in range(block):
                        start = time.perf_counter()
                        reply = client.score("bench", workers, r * 100 + i, tensor)
                        seconds[k].append(time.perf_counter() - start)
                        if not torch.equal(
                            reply.regret, torch.from_numpy(reference.regret)
                        ) or not torch.equal(reply.best_index, torch.from_numpy(reference.best_index)):
                            raise AssertionError(
                                f"{workers} workers: the service's answer differs from calculus.score"
                            )
            # Busy seconds include the warm-up calls; subtract their share to report the timed calls.
            busy = [
                (_busy_seconds(m) - b0) * sum(seconds[k]) / (sum(seconds[k]) + warm_seconds[k])
                for k, ((_w, _p, _port, m), b0) in enumerate(zip(services, busy0))
            ]
            for client in clients:
                client.close()
        finally:
            for _w, proc, _port, _m in services:
                proc.send_signal(signal.SIGTERM)
            for _w, proc, _port, _m in services:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for k, (workers, _proc, _port, _m) in enumerate(services):
        rows.append(
            {
                "workers": workers,
                "calls": calls,
                "batch": batch,
                "median_call_seconds": statistics.median(seconds[k]),
                "best_call_seconds": min(seconds[k]),
                "scenarios_per_second": batch / statistics.median(seconds[k]),
                "overall_scenarios_per_second": batch * calls / sum(seconds[k]),
                "worker_busy_seconds_per_call": busy[k] / calls,
            }
        )
    base = rows[0]["scenarios_per_second"]
    for row in rows:
        row["ratio_to_first"] = row["scenarios_per_second"] / base
        row["best_call_ratio_to_first"] = rows[0]["best_call_seconds"] / row["best_call_seconds"]
        # The same scenarios cost the same CPU whatever the worker count: much more busy time per
        # call means the workers waited for a CPU that another process held.
        row["disturbed"] = row["worker_busy_seconds_per_call"] > 1.4 * rows[0]["worker_busy_seconds_per_call"]
    return {
        "benchmark": "regret_workers",
        "what": "Score calls through the real gRPC service (one process per worker count, blocks alternating), "
        "bit-identical to calculus.score",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
        "machine_idle_percent_before": idle_before,
        "rounds": rounds,
        "warmup_calls_per_block": warmup,
        "regrets_per_step": 7,
        "bentham_per_regret": 3,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=20000, help="scenarios per Score call (default 20000)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per worker count (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each block (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="blocks per worker count, alternating (default 2)"
    )
    parser.add_argument(
        "--workers", default="1,2,4", help="worker counts, first is the baseline (default 1,2,4)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "regret_workers.json"))
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    result = run(workers, args.batch, args.calls, args.warmup, max(1, min(args.rounds, args.calls)))

    print(
        f"regret service throughput, {args.batch} scenarios per call, {args.calls} timed calls per worker count in "
        f"{result['rounds']} alternating blocks, each after {args.warmup} warm-up calls "
        f"({os.cpu_count()} CPUs, {result['machine_idle_percent_before']:.0f}% idle before the run)"
    )
    if (result["machine_idle_percent_before"] or 100) < 80:
        print(
            "warning: other processes were using the CPUs; the ratios understate the scaling", file=sys.stderr
        )
    print(
        f"{'workers':>7} | {'median call ms':>14} | {'scenarios/s':>12} | {'overall/s':>12} | {'busy s/call':>11} | "
        f"{'vs ' + str(workers[0]):>6} | {'best call ms':>12} | {'best vs ' + str(workers[0]):>9}"
    )
    print("-" * 104)
    for row in result["rows"]:
        print(
            f"{row['workers']:>7} | {row['median_call_seconds'] * 1e3:>14.1f} | {row['scenarios_per_second']:>12,.0f} | "
            f"{row['overall_scenarios_per_second']:>12,.0f} | {row['worker_busy_seconds_per_call']:>11.4f} | "
            f"{row['ratio_to_first']:>5.2f}x | {row['best_call_seconds'] * 1e3:>12.1f} | "
            f"{row['best_call_ratio_to_first']:>8.2f}x"
        )
    disturbed = [row["workers"] for row in result["rows"] if row["disturbed"]]
    if disturbed:
        print(
            f"warning: the workers of the {disturbed}-worker rows spent >40% more busy time per call than the "
            f"{workers[0]}-worker row: other processes took CPU during the run; run again on a quiet machine",
            file=sys.stderr,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
