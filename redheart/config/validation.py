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
    cfg.cpu_stage.check(fail)
    _check_endpoints(cfg, fail)
    cfg.wire.check(fail)
    cfg.security.check(fail)
    _check_local_tls(cfg, fail)
    cfg.checkpoint.check(fail)
    cfg.launch.check(fail)
    cfg.orchestrator.check(fail)
    _check_step_limits(cfg, fail)


def _check_regret_batch(cfg: HybridConfig, fail: Fail) -> None:
    """One micro-batch's regret requests must fit into one Score call."""
    r, t = cfg.regret, cfg.train
    if r.max_batch < t.micro_batch_size:
        fail(
            "regret",
            "max_batch",
            f"regret.max_batch = {r.max_batch} is below train.micro_batch_size = {t.micro_batch_size}",
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
