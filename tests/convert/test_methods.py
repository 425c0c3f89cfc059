"""Expert construction on one FFN: partitions, exact sums, sharing selection, upcycling layout."""

import pytest
import torch

from moeforge.convert.config import ConvertConfig
from moeforge.convert.methods import DenseFFN, LayerCalibration, LayerContext, get_method
from moeforge.convert.methods.importance import select_neurons
from moeforge.convert.methods.split import routing_aware_refine
from moeforge.convert.methods.upcycle import activation_scale


def _ffn(inter=64, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g),
                    torch.randn(hidden, inter, generator=g))


def _ctx(ffn, seed=0, calib=True, **cfg):
    x = torch.randn(200, ffn.hidden_size, generator=torch.Generator().manual_seed(1))
    cal = LayerCalibration(x=x, y=ffn(x)) if calib else None
    return LayerContext(0, ConvertConfig(**cfg), torch.Generator().manual_seed(seed), cal)


@pytest.mark.parametrize("method", ["random", "cluster", "coactivation"])
def test_split_is_a_partition_whose_experts_sum_to_the_dense_ffn(method):
    ffn = _ffn()
    ex = get_method(method).build(ffn, _ctx(ffn, method=method, experts=4))
    allidx = torch.cat(ex.groups).sort().values
    assert torch.equal(allidx, torch.arange(64))  # every neuron exactly once
    assert [len(g) for g in ex.groups] == [16] * 4
    x = torch.randn(5, 16)
    assert torch.allclose(ex.expert_outputs(x).sum(1), ffn(x), atol=1e-4)
    assert ex.default_scale == 4 / 2


def test_cluster_groups_are_balanced_and_deterministic_per_seed():
    ffn = _ffn(inter=96)
    build = get_method("cluster").build
    a = build(ffn, _ctx(ffn, seed=5, calib=False, method="cluster", experts=8)).groups
    b = build(ffn, _ctx(ffn, seed=5, calib=False, method="cluster", experts=8)).groups
    c = build(ffn, _ctx(ffn, seed=6, calib=False, method="cluster", experts=8)).groups
    assert [len(g) for g in a] == [12] * 8
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_cluster_puts_parallel_up_rows_together():
    # four directions, 8 neurons each (scaled copies): clustering on normalised up rows must find them
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4, 16, generator=g)
    up = torch.cat([dirs[i] * (1 + torch.rand(8, 1, generator=g)) for i in range(4)])
    ffn = DenseFFN(torch.randn(32, 16, generator=g), up, torch.randn(16, 32, generator=g))
    ex = get_method("cluster").build(ffn, _ctx(ffn, calib=False, method="cluster", experts=4))
    found = sorted(sorted(g.tolist()) for g in ex.groups)
    assert found == [list(range(i * 8, (i + 1) * 8)) for i in range(4)]


def test_shared_experts_take_the_groups_with_the_largest_output():
    ffn = _ffn()
    with torch.no_grad():
        ffn.down[:, :16] *= 50  # neurons 0-15 dominate the output
    ex = get_method("random").build(ffn, _ctx(ffn, method="random", experts=3, shared_experts=1))
    assert ex.shared_down.shape == (16, 16) and len(ex.groups) == 3
    for method in ("cluster", "coactivation"):  # the dominant neurons become the always-on expert
        ex = get_method(method).build(ffn, _ctx(ffn, method=method, experts=3, shared_experts=1))
        assert ex.shared_neurons.tolist() == list(range(16))
        assert torch.equal(torch.cat([ex.shared_neurons, *ex.groups]).sort().values, torch.arange(64))


def test_routing_aware_refinement_never_lowers_captured_output():
    g = torch.Generator().manual_seed(0)
    contrib = torch.rand(300, 40, generator=g) ** 4
    labels = torch.arange(40) % 4

    def captured(lab):
        cap = contrib @ torch.nn.functional.one_hot(lab, 4).float()
        return cap.topk(1, dim=1).values.sum()

    refined = routing_aware_refine(contrib, labels, 4, 1)
    assert torch.bincount(refined, minlength=4).tolist() == [10] * 4
    assert captured(refined) >= captured(labels)


def test_sharing_inner_and_inter_selection():
    imp = torch.tensor([[9.0, 8, 7, 1, 0, 0], [9, 0, 1, 8, 7, 0], [9, 0, 0, 1, 8, 7]])
    routed, shared = select_neurons(imp, 2, 0)
    assert [g.tolist() for g in routed] == [[0, 1], [0, 3], [0, 4]]  # overlap allowed (neuron 0)
    # SharingInter: 8 neurons = (3 routed + 1 shared) x 2
    imp = torch.tensor([[9.0, 8, 7, 1, 0, 0, 3, 2], [9, 0, 1, 8, 7, 0, 2, 3], [9, 0, 0, 1, 8, 7, 1, 1]])
    routed, shared = select_neurons(imp, 2, 1)
    # neuron 0 is nominated by all three clusters; 1, 3 and 4 by one each, 4 with the largest total
    assert [g.tolist() for g in shared] == [[0, 4]]
    # the rest is dealt without overlap, highest score first: (0,1) 8, (1,3) 8, (0,2) 7, (2,5) 7,
    # (1,7) 3 (expert 0 is full), then (2,6) 1
    assert [g.tolist() for g in routed] == [[1, 2], [3, 7], [5, 6]]


def test_sharing_inter_partitions_the_ffn_and_all_experts_sum_to_it():
    ffn = _ffn(inter=64)
    ctx = _ctx(ffn, method="importance", experts=3, shared_experts=1, top_k=1)
    g = torch.Generator().manual_seed(3)
    ctx.calib.importance = torch.rand(3, 64, generator=g)
    ex = get_method("importance").build(ffn, ctx)
    allidx = torch.cat(list(ex.groups) + [ex.shared_neurons]).sort().values
    assert torch.equal(allidx, torch.arange(64))  # every neuron exactly once
    assert ex.info["neuron_coverage"] == 1.0
    x = torch.randn(5, 16)
    assert torch.allclose(ex.expert_outputs(x).sum(1) + ex.shared_output(x), ffn(x), atol=1e-4)


def test_importance_method_uses_per_cluster_scores():
    ffn = _ffn(inter=12)
    ctx = _ctx(ffn, method="importance", experts=3)
    ctx.calib.importance = torch.stack([torch.arange(12.0), -torch.arange(12.0), torch.zeros(12)])
    ex = get_method("importance").build(ffn, ctx)
    assert ex.groups[0].tolist() == [8, 9, 10, 11] and ex.groups[1].tolist() == [0, 1, 2, 3]


def test_upcycle_copies_and_perturbations():
    ffn = _ffn()
    ex = get_method("upcycle").build(ffn, _ctx(ffn, calib=False, method="upcycle", experts=4))
    assert ex.gate_up.shape == (4, 128, 16)
    assert all(torch.equal(ex.gate_up[e, :64], ffn.gate) and torch.equal(ex.down[e], ffn.down) for e in range(4))
    noisy = get_method("upcycle").build(ffn, _ctx(ffn, calib=False, method="upcycle", experts=4, upcycle_noise=0.1))
    assert not torch.equal(noisy.gate_up[0], noisy.gate_up[1])
    drop = get_method("upcycle").build(ffn, _ctx(ffn, calib=False, method="upcycle", experts=4, upcycle_reinit=0.5))
    changed = (drop.down[0] != ffn.down).any(0).sum().item()
    assert changed == 32  # half of the 64 neurons re-initialised per expert


def test_granular_upcycle_layout_and_published_scale():
    ffn = _ffn()
    ex = get_method("granular-upcycle").build(
        ffn, _ctx(ffn, calib=False, method="granular-upcycle", experts=8, granularity=4))
    assert ex.down.shape == (8, 16, 16)
    assert ex.router_groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for e in range(8):  # expert e holds part e mod G
        part = e % 4
        assert torch.equal(ex.down[e], ffn.down[:, part * 16 : (part + 1) * 16])
    assert ex.default_scale == 4.0  # renormalised top-k: G
    assert activation_scale(4, 2 / 8) == 8 * 4 / 2  # Megatron, raw softmax weights: E*G/k


@pytest.mark.parametrize("router, options, top_k", [
    ("topk", {}, 2), ("topk", {"normalize_weights": False}, 2), ("switch", {}, 1), ("expert_choice", {}, 2),
    ("sigmoid_bias", {}, 2), ("sigmoid_bias", {"normalize_weights": False}, 2), ("noisy_topk", {}, 2),
])
def test_upcycled_layer_output_matches_the_dense_ffn_for_every_router(tiny_llama, router, options, top_k):
    """--rescale auto divides by a token's summed routing weights under a uniform router, so an
    upcycled layer starts out at the dense FFN's output whichever way its router weights experts."""
    import moeforge

    report = moeforge.convert(tiny_llama, None, method="upcycle", experts=8, top_k=top_k, router=router,
                              gate_init="uniform", eval_tokens=0, verify="off", **options)
    if router == "expert_choice":  # a token reaches c = 2 experts on average, each weighted ~1/E; ties under a
        assert report.model.config.moe["output_scale"] == pytest.approx(8 / 2)  # uniform router decide nothing
        return
    layer = report.model.model.layers[0].mlp.eval()
    x = torch.randn(64, 32)
    dense = moeforge.load(tiny_llama).model.layers[0].mlp
    with torch.no_grad():
        ratio = layer(x.unsqueeze(0)).hidden_states.norm() / dense(x.unsqueeze(0)).norm()
    assert float(ratio) == pytest.approx(1.0, rel=1e-4)
