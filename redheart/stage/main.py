"""The stage process main (``redheart-cpu-stage`` / ``redheart-gpu-stage``): the stage's part of
redheart/service_main.py (which section it reads, torch's threads, what it logs once listening)."""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry

from redheart.service_main import ServiceSpec, Started, run_service
from redheart.stage.server import StageServer

if typing.TYPE_CHECKING:
    from redheart.cli_common import StageArgs
    from redheart.config import HybridConfig

# The logger these lines always had: its name is part of every line the stage logs.
log = logging.getLogger("redheart.stage_service")


def run_stage_cli(stage: str, create_server: Callable[..., tuple[StageServer, int]], args: StageArgs) -> int:
    """The stage process main; ``args`` comes parsed from the click command in redheart/cli_common.py."""
    spec = ServiceSpec(
        name=f"{stage}_stage",
        label=f"{stage} stage",
        log_format=f"%(asctime)s {stage}-stage %(levelname)s %(name)s: %(message)s",
        log=log,
        error_prefix="error",
        start_errors=(
            ((OSError, RuntimeError, ValueError), 1, f"error: {stage} stage cannot start: {{exc}}"),
        ),
        drain_note="draining (health NOT_SERVING, in-flight calls finish)",
        stopped_line=f"{stage} stage stopped",
    )
    return run_service(spec, lambda config, a: start_stage(stage, create_server, config, a), args)


def start_stage(
    stage: str, create_server: Callable[..., tuple[StageServer, int]], config: HybridConfig, args: StageArgs
) -> Started:
    """Set torch's threads from ``[<stage>_stage]``, start the server on the flags' host and port
    (the section's by default)."""
    section = getattr(config, f"{stage}_stage")
    host = args.host or section.host
    port = section.port if args.port is None else args.port
    if section.threads:
        torch.set_num_threads(section.threads)
    try:
        # The stage runs one action at a time: an inter-op pool would only add threads competing
        # for the cores its intra-op threads use.
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed in this process (a test that runs several stages in one)
        pass
    log.info(
        "%s stage: torch threads intra-op %d, inter-op %d",
        stage,
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
    )
    registry = CollectorRegistry()
    server, bound = create_server(config, host=host, port=port, registry=registry)

    def announce(bound_metrics: int) -> None:
        d = server.servicer
        log.info(
            "%s stage listening on %s:%d (%s, %s, %d parameters, %s), metrics on %s",
            stage,
            host,
            bound,
            d.device,
            d.layer_range,
            d.runtime.num_parameters(),
            config.security.describe(),
            bound_metrics or "off",
        )

    return Started(server, bound, registry, section.metrics_port, announce)
