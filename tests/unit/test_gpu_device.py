"""The GPU stage's device handling that can be checked on CPU: precision reported over gRPC, the
probe, the verify reference's placement, losses without host syncs, per-device gauges."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from prometheus_client import CollectorRegistry

from gpu_stage.server import create_server as gpu_server
from orchestrator.reference import reference_placement
from orchestrator.stage_client import StageClient
from redheart.config import HybridConfig
from redheart.losses import label_counts, multitask_loss
from redheart.metrics_common import StageMetrics, nvml_handle
from redheart.stage.wire import STAGE_METHODS

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")


def _settings(cfg: HybridConfig) -> dict:
    return {"train": dataclasses.asdict(cfg.train), "regret": {"enabled": False}}


@pytest.mark.parametrize("mixed, expected", [(True, "bf16"), (False, "fp32")])
def test_the_stage_reports_the_precision_it_chose(mixed, expected):
    cfg = HybridConfig(
        model={"preset": "tiny"}, gpu_stage={"device": "cpu"}, train={"use_mixed_precision": mixed}
    )
    server, port = gpu_server(cfg, host="127.0.0.1", port=0)
    client = StageClient("gpu stage", f"127.0.0.1:{port}", max_message_mb=64, rpc_timeout=20)
    try:
        before = client.describe()
        assert (before.precision, before.device_name, before.total_memory_bytes) == ("", "cpu", 0)
        client.start_run(
            "r1",
            _settings(cfg),
            next_address="",
            prev_address="127.0.0.1:1",
            regret_address="",
            first_step=0,
            reinitialize=True,
        )
        assert client.precision == expected and client.precision_reason
        assert client.describe().precision == expected
    finally:
        client.close()
        server.stop(0)


@no_cuda
def test_the_probe_says_why_a_device_cannot_be_used():
    from gpu_stage.device import probe

    with pytest.raises(RuntimeError, match="the probe of cuda:0 failed: CUDA is not available"):
        probe("cuda:0", timeout=120)


@no_cuda
def test_preflight_names_the_configured_device_when_cuda_is_missing(tmp_path):
    from orchestrator.preflight import preflight

    cfg = HybridConfig(
        model={"preset": "tiny"},
        gpu_stage={"device": "cuda:1"},
        orchestrator={"output_dir": str(tmp_path / "run")},
        data={"path": str(tmp_path / "none.jsonl")},
    )
    out = io.StringIO()
    report = preflight(cfg, out=out)
    assert not report.ok
    text = out.getvalue()
    assert "CUDA for gpu_stage.device = 'cuda:1': not usable: the probe of cuda:1 failed" in text
    assert "GPU stage memory estimate" in text and "cuda_context 0.59" in text


def test_the_reference_runs_the_gpu_part_where_the_pipeline_does():
    assert reference_placement("cpu", cuda_available=False) == (torch.device("cpu"), "")
    assert reference_placement("cuda:1", cuda_available=True) == (torch.device("cuda:1"), "")
    device, note = reference_placement("cuda:0", cuda_available=False)
    assert device == torch.device("cpu") and "model.dropout = 0" in note
    with pytest.raises(ValueError, match="'mps'"):
        reference_placement("mps", cuda_available=False)


def test_losses_from_host_counts_and_lazy_values_equal_the_eager_path():
    torch.manual_seed(0)
    outputs = {
        "emotion_logits": torch.randn(4, 6),
        "bentham": torch.rand(4, 8),
        "judgment_logits": torch.randn(4, 5),
        "regret": torch.rand(4),
    }
    for masks in ([1, 0, 1, 1], [0, 0, 0, 0]):
        labels = {
            "labels.emotions": torch.rand(4, 6).round(),
            "labels.emotions_mask": torch.tensor(masks, dtype=torch.bool),
            "labels.bentham": torch.rand(4, 8),
            "labels.bentham_mask": torch.tensor(masks[::-1], dtype=torch.bool),
            "labels.judgment": torch.tensor([-100 if m == 0 else 2 for m in masks]),
        }
        target = torch.rand(4)
        eager_total, eager = multitask_loss(outputs, labels, target, {"bentham": 2.0})
        lazy_total, lazy = multitask_loss(
            outputs, labels, target, {"bentham": 2.0}, label_counts=label_counts(labels), lazy=True
        )
        assert torch.equal(eager_total, lazy_total)
        assert set(eager) == set(lazy) and all(
            torch.is_tensor(v) and float(v) == eager[k] for k, v in lazy.items()
        )
    assert label_counts(labels) == {"emotion": 0, "bentham": 0, "judgment": 0}


def test_gpu_gauges_stay_zero_on_cpu_and_nvml_is_optional():
    registry = CollectorRegistry()
    metrics = StageMetrics(registry, stage="gpu", methods=STAGE_METHODS)
    metrics.bind_device("cpu")
    for name in (
        "redheart_gpu_memory_allocated_bytes",
        "redheart_gpu_memory_reserved_bytes",
        "redheart_gpu_utilization_ratio",
    ):
        assert registry.get_sample_value(name, {"stage": "gpu"}) == 0.0
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert nvml_handle(0) is None  # without the `gpu` extra the gauge simply stays 0


def test_the_split_profiles_a_device_in_a_child_process_in_the_stage_precision():
    from orchestrator.autosplit import profile_in_subprocess
    from redheart.model import resolve_model_shape

    cfg = HybridConfig(model={"preset": "tiny"}, train={"use_mixed_precision": True})
    shape = resolve_model_shape(cfg.model)
    prof = profile_in_subprocess(cfg, shape, "cpu", 1, 2, 16, "gpu", timeout=300)
    assert prof.device == "cpu" and prof.precision == "bf16"
    assert prof.layer_seconds > 0 and prof.fixed_seconds > 0 and prof.optimizer_seconds_per_param > 0
    with pytest.raises(ValueError, match="profiling the gpu stage's layers on cpu failed"):
        profile_in_subprocess(
            cfg, dataclasses.replace(shape, num_heads=3), "cpu", 1, 2, 16, "gpu", timeout=300
        )


@pytest.mark.cuda
def test_gpu_gauges_read_the_stage_device_at_scrape_time():
    index = (
        torch.cuda.device_count() - 1
    )  # the last card: a device-0 reading would be wrong on multi-GPU hosts
    registry = CollectorRegistry()
    metrics = StageMetrics(registry, stage="gpu", methods=STAGE_METHODS)
    metrics.bind_device(f"cuda:{index}")
    before = registry.get_sample_value("redheart_gpu_memory_allocated_bytes", {"stage": "gpu"})
    block = torch.empty(64 << 20, dtype=torch.uint8, device=f"cuda:{index}")
    after = registry.get_sample_value("redheart_gpu_memory_allocated_bytes", {"stage": "gpu"})
    assert after - before >= 64 << 20
    assert registry.get_sample_value("redheart_gpu_memory_reserved_bytes", {"stage": "gpu"}) >= after
    del block
