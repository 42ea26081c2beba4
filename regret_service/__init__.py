"""The regret scoring service: a gRPC front process and a pool of scoring worker processes.

* :mod:`regret_service.logic` – the worker pool (no torch, no grpc);
* :mod:`regret_service.servicer` – decode, validate, call the pool, encode;
* :mod:`regret_service.metrics` – the process's Prometheus metrics;
* :mod:`regret_service.server` – ``create_server(config) -> (RegretServer, port)``;
* :mod:`regret_service.cli` – ``redheart-regret --config hybrid.toml``.

See docs/regret.md.
"""
