import pytest
import torch

from redheart.config import ModelConfig
from redheart.losses import multitask_loss
from redheart.model import (
    CpuStageModule,
    GpuStageModule,
    count_parameters,
    resolve_model_shape,
)


def numel(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_analytic_counts_match_the_built_modules(preset):
    shape = resolve_model_shape(ModelConfig(preset=preset))
    counts = count_parameters(shape)
    assert numel(CpuStageModule(shape)) == counts["cpu_stage"]
    assert numel(GpuStageModule(shape)) == counts["gpu_stage"]


def test_tiny_is_under_2m_parameters():
    assert count_parameters(resolve_model_shape(ModelConfig(preset="tiny")))["total"] < 2_000_000


def test_base_preset_is_200m_within_5_percent():
    # Counted from the shape (the analytic count is checked against built modules above).
    total = count_parameters(resolve_model_shape(ModelConfig(preset="base")))["total"]
    assert abs(total - 200_000_000) <= 0.05 * 200_000_000, total


@pytest.mark.parametrize("target", [5_000_000, 30_000_000, 200_000_000])
def test_target_params_picks_a_shape_near_the_target(target):
    shape = resolve_model_shape(ModelConfig(target_params=target))
    total = count_parameters(shape)["total"]
    assert abs(total - target) / target < 0.1, (shape, total)
    assert shape.hidden_size % shape.num_heads == 0


def test_split_follows_ratio_or_explicit_layers():
    assert resolve_model_shape(ModelConfig(preset="base")).cpu_layers == 5  # 40% of 13
    assert resolve_model_shape(ModelConfig(preset="tiny", gpu_layers_ratio=1.0)).cpu_layers == 0
    assert resolve_model_shape(ModelConfig(preset="tiny", cpu_layers=3)).cpu_layers == 3
    with pytest.raises(ValueError, match="cpu_layers = 9 must be in 0..4"):
        resolve_model_shape(ModelConfig(preset="tiny", cpu_layers=9))


def test_weights_do_not_depend_on_where_the_split_is():
    a = resolve_model_shape(ModelConfig(preset="tiny", cpu_layers=1))
    b = resolve_model_shape(ModelConfig(preset="tiny", cpu_layers=3))
    gpu_a = dict(GpuStageModule(a).global_named_parameters())
    cpu_b = dict(CpuStageModule(b).global_named_parameters())
    for name in ("layers.1.attn.qkv.weight", "layers.2.ffn_in.weight"):
        assert torch.equal(gpu_a[name], cpu_b[name])


def test_composed_stages_give_activated_heads():
    shape = resolve_model_shape(ModelConfig(preset="tiny"))
    ids = torch.randint(4, shape.vocab_size, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 5:] = 0
    out = GpuStageModule(shape)(CpuStageModule(shape)(ids, mask), mask)
    assert out["emotion_logits"].shape == (3, 6) and out["judgment_logits"].shape == (3, 5)
    b = out["bentham"]
    assert (
        b.shape == (3, 8) and (b[:, :7] >= 0).all() and (b[:, :7] <= 1).all() and (b[:, 7].abs() <= 1).all()
    )
    assert (out["regret"] >= 0).all()


def test_padding_does_not_change_the_prediction():
    shape = resolve_model_shape(ModelConfig(preset="tiny"))
    cpu, gpu = CpuStageModule(shape).eval(), GpuStageModule(shape).eval()
    ids = torch.randint(4, shape.vocab_size, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long()
    a = gpu(cpu(ids, torch.ones(1, 6, dtype=torch.long)), torch.ones(1, 6, dtype=torch.long))
    b = gpu(cpu(padded, mask), mask)
    torch.testing.assert_close(a["bentham"], b["bentham"], rtol=1e-5, atol=1e-6)


def _outputs(b=4):
    g = torch.Generator().manual_seed(0)
    return {
        "emotion_logits": torch.randn(b, 6, generator=g, requires_grad=True),
        "bentham": torch.rand(b, 8, generator=g).requires_grad_(),
        "judgment_logits": torch.randn(b, 5, generator=g, requires_grad=True),
        "regret": torch.rand(b, generator=g).requires_grad_(),
    }


def _labels(b=4, emo_mask=True, ben_mask=True, judgment=None):
    return {
        "labels.emotions": torch.ones(b, 6),
        "labels.emotions_mask": torch.full((b,), emo_mask),
        "labels.bentham": torch.zeros(b, 8),
        "labels.bentham_mask": torch.full((b,), ben_mask),
        "labels.judgment": torch.tensor(judgment if judgment is not None else [0, 1, 2, 3]),
    }


def test_missing_labels_mask_their_head():
    out = _outputs()
    total, parts = multitask_loss(out, _labels(emo_mask=False, judgment=[-100] * 4), None)
    assert set(parts) == {"bentham"}
    total.backward()
    assert out["emotion_logits"].grad is None or float(out["emotion_logits"].grad.abs().sum()) == 0.0


def test_partial_mask_averages_only_labelled_rows():
    out = _outputs()
    labels = _labels()
    labels["labels.bentham_mask"] = torch.tensor([True, False, False, False])
    _, parts = multitask_loss(out, labels, None)
    assert parts["bentham"] == pytest.approx(float((out["bentham"][0].detach() ** 2).mean()), rel=1e-6)


def test_no_labels_at_all_is_a_zero_loss_with_a_graph():
    out = _outputs()
    total, parts = multitask_loss(out, _labels(emo_mask=False, ben_mask=False, judgment=[-100] * 4), None)
    assert parts == {} and float(total.detach()) == 0.0
    total.backward()


def test_regret_and_weights():
    out = _outputs()
    target = torch.zeros(4)
    total, parts = multitask_loss(out, _labels(), target, {"regret": 2.0, "emotion": 0.0})
    expected = parts["bentham"] + parts["judgment"] + 2.0 * parts["regret"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    shape = resolve_model_shape(ModelConfig(preset="tiny", dropout=0.1))
    ids = torch.randint(4, shape.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    grads = []
    for checkpointing in (False, True):
        cpu, gpu = (
            CpuStageModule(shape, checkpointing=checkpointing),
            GpuStageModule(shape, checkpointing=checkpointing),
        )
        torch.manual_seed(7)  # the same dropout masks; recomputation must replay them
        out = gpu(cpu(ids, mask), mask)
        (out["bentham"].sum() + out["emotion_logits"].sum()).backward()
        grads.append(
            {
                n: p.grad.clone()
                for n, p in list(cpu.global_named_parameters()) + list(gpu.global_named_parameters())
                if p.grad is not None
            }
        )
    assert len(grads[0]) == len(grads[1]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_token_embedding_gradient_accumulates_in_place_like_the_stock_backward():
    # The CPU stage's lookup adds rows into one .grad buffer instead of a dense [V, H] per backward:
    # over several micro-batches (repeated ids included) the gradient must match torch's own.
    from redheart.config import HybridConfig
    from redheart.model import CpuStageModule, resolve_model_shape

    shape = resolve_model_shape(HybridConfig(model={"preset": "tiny", "dropout": 0.0}).model)
    ours, stock = CpuStageModule(shape), CpuStageModule(shape)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 12), generator=g)  # few distinct ids: many repeats
        mask = torch.ones_like(ids)
        weights = torch.randn(2, 12, shape.hidden_size, generator=g)
        (ours(ids, mask) * weights).sum().backward()
        positions = torch.arange(12)
        x = stock.token(ids) + stock.position(positions)[None]
        (stock.stack(stock.dropout(x), mask.bool()) * weights).sum().backward()
    torch.testing.assert_close(ours.token.weight.grad, stock.token.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.position.weight.grad, stock.position.weight.grad, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(shape.vocab_size, dtype=torch.bool)
    untouched[:50] = False
    assert bool((ours.token.weight.grad[untouched] == 0).all())
    with torch.no_grad():  # evaluation: the plain lookup
        assert torch.equal(ours(ids, mask), ours.eval()(ids, mask))
