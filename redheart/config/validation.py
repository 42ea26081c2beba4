"""The rules that combine sections; each section's own rules are its ``check`` method.

``_validate`` runs every rule after loading and after every change (``config.batch_size = 4``,
``replace``); the first broken one raises a ConfigError naming where the value was set, the
values involved and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from redheart.config.endpoints import SERVICE_SECTIONS, Endpoint
from redheart.config.errors import ConfigError, Fail, _did_you_mean

if TYPE_CHECKING:
    from redheart.config.hybrid import HybridConfig
    from redheart.config.loader import _Origin


def _validate(cfg: HybridConfig, origin: _Origin) -> None:
    def fail(section: str, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{origin.where(section, key)}: {message}")

    # Each section's own checks, and the cross-section rules right after the sections they read, in
    # the order the single validator ran them before the split (the first broken rule is reported).

    cfg.train.check(fail)
    # Kept here rather than in TrainConfig.check: the head names come from the head registry (built-in
    # and registered heads), which imports the data schema; imported here to keep config import-light.
    from redheart.heads import head_names

    for head in cfg.train.loss_weights:
        if head not in head_names():
            fail(
                "train",
                "loss_weights",
                f"train.loss_weights has unknown head `{head}`{_did_you_mean(head, head_names())}",
            )
    cfg.model.check(fail)
    cfg.data.check(fail)
    cfg.regret.check(fail)
    _check_regret_batch(cfg, fail)
    cfg.gpu_stage.check(fail)
    _check_stage_count(cfg, fail)
    cfg.cpu_stage.check(fail)
    _check_endpoints(cfg, fail)
    cfg.wire.check(fail)
    cfg.security.check(fail)
    _check_local_tls(cfg, fail)
    cfg.checkpoint.check(fail)
    cfg.launch.check(fail)
    cfg.orchestrator.check(fail)
    _check_step_limits(cfg, fail)
    cfg.parallel.check(fail)
    _check_replica_shares(cfg, fail)


def _check_regret_batch(cfg: HybridConfig, fail: Fail) -> None:
    """One micro-batch's regret requests must fit into one Score call."""
    r, t = cfg.regret, cfg.train
    if r.max_batch < t.micro_batch_size:
        fail(
            "regret",
            "max_batch",
            f"regret.max_batch = {r.max_batch} is below train.micro_batch_size = {t.micro_batch_size}",
        )


def _check_stage_count(cfg: HybridConfig, fail: Fail) -> None:
    """The GPU stage lists (devices, addresses) and this process's rank against the stage count."""
    g = cfg.gpu_stage
    stages = max(2, len(cfg.model.stage_layers))
    if not 0 <= g.rank < stages:
        fail(
            "gpu_stage",
            "rank",
            f"gpu_stage.rank = {g.rank} must be in 1..{stages - 1} (or 0: the last stage); "
            f"model.stage_layers gives {stages} stages",
        )
    replicas = cfg.parallel.data_parallel
    if g.devices and len(g.devices) != stages - 1:
        fail(
            "gpu_stage",
            "devices",
            f"gpu_stage.devices has {len(g.devices)} entries; the {stages} stages of model.stage_layers "
            f"have {stages - 1} GPU stage processes",
        )
    if g.addresses and len(g.addresses) != replicas * (stages - 1):
        fail(
            "gpu_stage",
            "addresses",
            f"gpu_stage.addresses has {len(g.addresses)} entries; {replicas} replica(s) of {stages} stages "
            f"have {replicas * (stages - 1)} GPU stage processes",
        )
    c = cfg.cpu_stage.addresses
    if c and len(c) != replicas:
        fail("cpu_stage", "addresses", f"cpu_stage.addresses has {len(c)} entries for {replicas} replica(s)")
    if replicas > 1 and cfg.launch.mode == "remote" and not c:
        fail(
            "cpu_stage",
            "addresses",
            f'launch.mode = "remote" with parallel.data_parallel = {replicas} needs cpu_stage.addresses '
            f"(one per replica) and gpu_stage.addresses",
        )
    if stages > 2 and cfg.launch.mode == "local" and cfg.launch.ports == "fixed":
        fail(
            "launch",
            "ports",
            f'launch.ports = "fixed" gives every GPU stage process gpu_stage.port; the {stages} stages of '
            f'model.stage_layers need launch.ports = "auto" when started locally',
        )
    if (stages > 2 or replicas > 1) and cfg.launch.mode == "remote" and not g.addresses:
        fail(
            "gpu_stage",
            "addresses",
            f'launch.mode = "remote" with {stages} stages and {replicas} replica(s) needs gpu_stage.addresses: '
            f"one address per GPU stage process, replica by replica ({replicas * (stages - 1)})",
        )


def _check_replica_shares(cfg: HybridConfig, fail: Fail) -> None:
    """Every replica needs at least one micro-batch of every accumulation round."""
    replicas = cfg.parallel.data_parallel
    if replicas > 1 and cfg.micro_batches < replicas:
        fail(
            "parallel",
            "data_parallel",
            f"parallel.data_parallel = {replicas} replicas share {cfg.micro_batches} micro-batch(es) per round "
            f"(train.batch_size {cfg.train.batch_size} / micro_batch_size {cfg.train.micro_batch_size}); "
            f"every replica needs at least one (fix: a larger batch_size or a smaller micro_batch_size)",
        )


def _check_endpoints(cfg: HybridConfig, fail: Fail) -> None:
    """Ports in range; in remote mode, stages the orchestrator can find without starting them."""
    for section in SERVICE_SECTIONS:
        for key, problem in Endpoint.of(section, getattr(cfg, section)).problems():
            fail(section, key, problem)
    if cfg.launch.mode == "remote":
        for section in ("cpu_stage", "gpu_stage"):
            if not Endpoint.of(section, getattr(cfg, section)).known_in_advance:
                fail(
                    section,
                    "port",
                    f'launch.mode = "remote" needs {section}.address or a fixed {section}.port',
                )


def _check_local_tls(cfg: HybridConfig, fail: Fail) -> None:
    """Services started locally serve TLS only with a certificate of their own."""
    s = cfg.security
    if s.tls_ca and not s.tls_cert and cfg.launch.mode == "local":
        fail(
            "security",
            "tls_ca",
            'security.tls_ca turns TLS on, but launch.mode = "local" starts the services, '
            "which need security.tls_cert and security.tls_key to serve TLS (fix: set both)",
        )


def _check_step_limits(cfg: HybridConfig, fail: Fail) -> None:
    """A step the orchestrator plans must be within what the stages accept (wire limits)."""
    o, w = cfg.orchestrator, cfg.wire
    if o.step_deadline_seconds > w.max_deadline_seconds:
        fail(
            "orchestrator",
            "step_deadline_seconds",
            f"orchestrator.step_deadline_seconds = {o.step_deadline_seconds} is above wire.max_deadline_seconds = "
            f"{w.max_deadline_seconds}: the stages would refuse every step (fix: raise wire.max_deadline_seconds)",
        )
    if w.max_plan_samples < cfg.train.batch_size:
        fail(
            "wire",
            "max_plan_samples",
            f"wire.max_plan_samples = {w.max_plan_samples} is below train.batch_size = "
            f"{cfg.train.batch_size}: the stages would refuse every step (fix: raise wire.max_plan_samples)",
        )
