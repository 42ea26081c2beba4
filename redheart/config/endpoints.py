"""One endpoint type: a service's bind host, port, client address and metrics port.

The gRPC services' sections (cpu_stage, gpu_stage, regret) describe their endpoint with the same
four fields: ``host``, ``port``, ``address`` and ``metrics_port``. The TOML keys and attributes stay
where they are (``cfg.gpu_stage.port``); the rules about them live here once: the port range, the
address clients use when ``address`` is empty, whether a remote service can be found without
being started by the orchestrator, and how an address splits into host and port.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SERVICE_SECTIONS = ("cpu_stage", "gpu_stage", "regret")
"""Sections that describe a gRPC service's endpoint (host, port, address, metrics_port)."""

_ANY_INTERFACE = ("0.0.0.0", "", "::", "[::]")


def client_host(host: str) -> str:
    """The host a client on this machine uses to reach a server bound to `host`."""
    # A server bound to every interface is reached on loopback from the same machine.
    return "127.0.0.1" if host in _ANY_INTERFACE else host


def port_problem(dotted: str, port: int) -> str | None:
    """Why `port` cannot be a TCP port (0 stands for any free one), naming the field; or None."""
    if not 0 <= port <= 65535:
        return f"{dotted} = {port} must be in 0..65535"
    return None


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6 address]:port" into (host without brackets, port); ValueError for a bad port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Endpoint:
    """The endpoint fields of one service section, read together."""

    section: str
    """The section's name, e.g. "gpu_stage", used in dotted field names of messages."""
    host: str
    """Interface the service binds."""
    port: int
    """Port it listens on (0: any free port, known only once it started)."""
    address: str = ""
    """Where clients reach it (empty: the client host of `host`, and `port`)."""
    metrics_port: int = 0
    """Its Prometheus /metrics port (0: disabled)."""

    @classmethod
    def of(cls, section: str, values: Any) -> Endpoint:
        """The endpoint of a section object, e.g. ``Endpoint.of("gpu_stage", cfg.gpu_stage)``."""
        return cls(section, values.host, values.port, values.address, values.metrics_port)

    def client_address(self) -> str:
        """host:port as clients dial it: `address` when set, else derived from the bind host."""
        return self.address or f"{client_host(self.host)}:{self.port}"

    @property
    def known_in_advance(self) -> bool:
        """Whether a client can find the service without starting it: an address or a fixed port."""
        return bool(self.address) or self.port != 0

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each port field out of range, `port` before `metrics_port`."""
        out = []
        for key, port in (("port", self.port), ("metrics_port", self.metrics_port)):
            problem = port_problem(f"{self.section}.{key}", port)
            if problem:
                out.append((key, problem))
        return out
