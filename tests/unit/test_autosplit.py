import pytest

from orchestrator.autosplit import DeviceProfile, choose_split, predict_step_seconds, resolve_auto_split
from redheart.config import HybridConfig
from redheart.model import resolve_model_shape


def config(**model):
    return HybridConfig(
        model={
            "preset": "custom",
            "hidden_size": 256,
            "num_layers": 10,
            "num_heads": 4,
            "vocab_size": 4096,
            "max_seq_len": 64,
            "gpu_layers_ratio": "auto",
            **model,
        },
        train={"batch_size": 16, "micro_batch_size": 2},
    )


def profile(layer, fixed=0.001, opt=1e-9, device="cpu"):
    return DeviceProfile(device, 1, layer, fixed, opt)


def test_a_fast_gpu_takes_most_layers():
    choice = choose_split(config(), cpu_profile=profile(0.050), gpu_profile=profile(0.005, device="cuda"))
    assert choice.cpu_layers <= 1
    assert "Chose" in choice.reason and "fixed 40/60" in choice.reason


def test_equal_devices_balance_the_stages():
    choice = choose_split(
        config(), cpu_profile=profile(0.010, fixed=0.0), gpu_profile=profile(0.010, fixed=0.0)
    )
    assert choice.cpu_layers == 5


def test_the_choice_minimises_the_predicted_step_time():
    cfg = config()
    cpu, gpu = profile(0.012, fixed=0.004), profile(0.010, fixed=0.002)
    choice = choose_split(cfg, cpu_profile=cpu, gpu_profile=gpu)
    shape = resolve_model_shape(cfg.model)
    best = min(
        range(11),
        key=lambda k: predict_step_seconds(shape, k, cfg.micro_batches, cpu, gpu, choice.wire_seconds),
    )
    assert choice.cpu_layers == best
    assert choice.predicted_step_seconds == pytest.approx(min(choice.candidates.values()))


def test_the_gpu_memory_budget_excludes_splits_and_can_refuse():
    cfg = config().replace(**{"gpu_stage.gpu_memory_gb": 0.02})
    choice = choose_split(cfg, cpu_profile=profile(0.050), gpu_profile=profile(0.001, device="cuda"))
    assert choice.excluded and min(choice.excluded) < choice.cpu_layers  # fewer CPU layers would not fit
    with pytest.raises(ValueError, match="no split fits gpu_memory_gb"):
        choose_split(
            cfg.replace(**{"gpu_stage.gpu_memory_gb": 1e-6}),
            cpu_profile=profile(0.05),
            gpu_profile=profile(0.001),
        )


def test_resolve_measures_here_in_local_mode_and_refuses_remote():
    cfg, choice = resolve_auto_split(config(num_layers=4, hidden_size=64))
    assert choice is not None and cfg.model.cpu_layers == choice.cpu_layers
    assert choice.cpu.layer_seconds > 0 and choice.gpu.layer_seconds > 0
    fixed, none = resolve_auto_split(config(cpu_layers=2))
    assert none is None and fixed.model.cpu_layers == 2
    with pytest.raises(ValueError, match='needs launch.mode = "local"'):
        resolve_auto_split(
            config().replace(
                **{"launch.mode": "remote", "cpu_stage.address": "a:1", "gpu_stage.address": "b:2"}
            )
        )


def _on_this_cpu(cpu_threads: int, gpu_threads: int) -> HybridConfig:
    return config(num_layers=4, hidden_size=64).replace(
        **{"gpu_stage.device": "cpu", "cpu_stage.threads": cpu_threads, "gpu_stage.threads": gpu_threads}
    )


def test_one_layer_time_serves_both_stages_on_the_same_cpu():
    choice = choose_split(_on_this_cpu(1, 1))
    assert choice.gpu.layer_seconds == choice.cpu.layer_seconds
    assert "measured once" in choice.reason


def test_stages_with_different_threads_are_measured_apart(monkeypatch):
    import orchestrator.autosplit as autosplit

    measured = []
    real = autosplit.profile_device

    def spy(*args, **kwargs):
        measured.append(kwargs.get("layer_seconds"))
        return real(*args, **kwargs)

    monkeypatch.setattr(autosplit, "profile_device", spy)
    choice = choose_split(_on_this_cpu(2, 1))
    assert measured == [None, None]
    assert "measured once" not in choice.reason


def test_a_timing_is_the_fastest_rep_after_a_warm_up(monkeypatch):
    import torch

    import orchestrator.autosplit as autosplit

    clock = [0.0]
    durations = iter([9.0, 0.5, 0.2, 0.7])  # the warm-up, then a neighbour's burst around the fastest rep
    monkeypatch.setattr(autosplit.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += next(durations)

    assert autosplit._time(call, torch.device("cpu"), reps=3) == pytest.approx(0.2)
