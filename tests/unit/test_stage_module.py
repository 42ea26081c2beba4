"""StageModule: one module for any stage (layers [a, b), embeddings in front of the first, heads
behind the last), so a pipeline of p stages is the same model as two stages or one process."""

import pytest
import torch

from redheart.config import ModelConfig
from redheart.heads import probe_labels
from redheart.losses import multitask_loss
from redheart.model import CpuStageModule, GpuStageModule, StageModule, resolve_model_shape

SHAPE = resolve_model_shape(ModelConfig(preset="tiny", dropout=0.0))
L = SHAPE.num_layers


def stages(cuts: list[int]) -> list[StageModule]:
    """Stages cut at the given layer indices: [1, 3] gives layers [0,1), [1,3), [3,L)."""
    bounds = [0, *cuts, L]
    last = len(bounds) - 2
    return [
        StageModule(SHAPE, range(a, b), embeddings=i == 0, heads=i == last)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SHAPE.vocab_size, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    return ids, mask


def run(modules, ids, mask):
    x = ids
    for m in modules:
        x = m(x, mask)
    return x


def global_params(modules) -> dict[str, torch.Tensor]:
    return {name: p for m in modules for name, p in m.global_named_parameters()}


@pytest.mark.parametrize("cuts", [[], [2], [1, 3], [1, 2, 3]])
def test_any_number_of_stages_is_the_same_model_bit_for_bit(cuts):
    whole = stages([])
    split = stages(cuts)
    ref, got = global_params(whole), global_params(split)
    assert list(ref) == list(got)  # same names, same order
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    ids, mask = batch()
    out_whole, out_split = run(whole, ids, mask), run(split, ids, mask)
    assert out_whole.keys() == out_split.keys()
    assert all(torch.equal(out_whole[k], out_split[k]) for k in out_whole)
    labels = probe_labels(3, torch.device("cpu"))
    for outputs in (out_whole, out_split):
        loss, _ = multitask_loss(outputs, labels, torch.zeros(3))
        loss.backward()
    grads_whole = {n: p.grad for n, p in global_params(whole).items()}
    grads_split = {n: p.grad for n, p in global_params(split).items()}
    assert all(g is not None for g in grads_whole.values())
    assert all(torch.equal(grads_whole[n], grads_split[n]) for n in grads_whole)


def test_the_two_stage_classes_are_the_first_and_last_stage():
    cpu, gpu = CpuStageModule(SHAPE), GpuStageModule(SHAPE)
    first, last = stages([SHAPE.cpu_layers])
    for mine, theirs in ((cpu, first), (gpu, last)):
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        assert all(
            torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values())
        )
    assert not any(k.startswith(("token", "position")) for k in gpu.state_dict())
    assert not any(k.startswith(("norm", "pooler")) for k in cpu.state_dict())


def test_a_middle_stage_maps_hidden_to_hidden():
    middle = StageModule(SHAPE, range(1, 3), embeddings=False, heads=False)
    hidden = torch.randn(2, 5, SHAPE.hidden_size)
    out = middle(hidden, torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == hidden.shape
    names = [n for n, _ in middle.global_named_parameters()]
    assert names and all(n.startswith(("layers.1.", "layers.2.")) for n in names)  # no embeddings, no heads
    assert any(n.startswith("layers.1.") for n in names) and any(n.startswith("layers.2.") for n in names)
