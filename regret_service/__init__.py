"""The regret scoring service: a gRPC front process and a pool of scoring worker processes.

* :mod:`regret_service.logic` – the worker pool (no torch, no grpc);
* :mod:`regret_service.worker` – one worker process: its body, start and ready handshake;
* :mod:`regret_service.pool_types` – what the pool answers and raises, the chunk plan;
* :mod:`regret_service.servicer` – decode, validate, call the pool, encode;
* :mod:`regret_service.metrics` – the process's Prometheus metrics;
* :mod:`regret_service.server` – ``create_server(config) -> (RegretServer, port)``;
* :mod:`regret_service.cli` – ``redheart-regret --config hybrid.toml`` (on redheart/service_main.py).

See docs/regret.md.
"""
