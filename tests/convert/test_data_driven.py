"""Data-driven construction, router init, rescaling and refinement on a tiny model with a tokenizer."""

import pytest
import torch

import moeforge
from moeforge.convert.calibration import DenseRunner, calibration_windows, importance_pass
from moeforge.convert.methods import DenseFFN
from moeforge.convert.source import open_source
from moeforge.loading import load_tokenizer

FAST = dict(calibration_tokens=1024, calibration_seq_len=64, eval_tokens=0)


def test_dense_runner_reproduces_the_dense_model(tiny_llama):
    """The layer-by-layer calibration runner computes exactly what the dense model computes."""
    from transformers import AutoModelForCausalLM

    source = open_source(tiny_llama)
    runner = DenseRunner(source)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    h = runner.embed(ids)
    for i in range(source.num_layers):
        h, calib = runner.layer(i, h, DenseFFN(*source.read_ffn(i)))
    norm, head = runner.head_weights()
    ours = runner._rms(h, norm) @ head.T
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert calib.x.shape == (48, 32) and calib.y.shape == (48, 32)


def test_importance_matches_autograd_on_the_whole_model(tiny_llama):
    """The layer-wise reverse pass gives the same |a . dL/da| as backpropagating through the full model."""
    from transformers import AutoModelForCausalLM

    source = open_source(tiny_llama)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    imp, clusters = importance_pass(DenseRunner(source), windows, 2, generator=torch.Generator().manual_seed(0),
                                    read_ffn=lambda i: DenseFFN(*source.read_ffn(i)))
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    acts = {}

    def hook(i):
        def fn(module, args):
            args[0].retain_grad()
            acts[i] = args[0]
        return fn

    for i, layer in enumerate(dense.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(hook(i))
    dense(windows, labels=windows).loss.backward()
    for i in range(2):
        per_window = (acts[i] * acts[i].grad).sum(1).abs()  # (N, I)
        want = torch.stack([per_window[clusters == c].mean(0) for c in range(2)])
        torch.testing.assert_close(imp[i], want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="coactivation", gate_init="activation", rescale="fit"),
        dict(method="cluster", gate_init="centroid", rescale="layerwise"),
        dict(method="importance", gate_init="activation", rescale="auto"),
        dict(method="importance", experts=3, shared_experts=1, top_k=1, gate_init="random", rescale="fit"),
        dict(method="coactivation", gate_init="activation", rescale="fit", refine="router", refine_steps=20),
        dict(method="random", gate_init="random", rescale="layerwise", refine="all", refine_steps=10),
        dict(method="coactivation", gate_init="activation", rescale="fit", refine="down"),
        dict(method="cluster", experts=3, shared_experts=1, top_k=1, gate_init="centroid", rescale="fit",
             refine="router+down", refine_steps=10),
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_data_driven_options_run_and_report(tiny_llama, options):
    opts = {"experts": 4, "top_k": 2, **options}
    report = moeforge.convert(tiny_llama, None, **opts, **FAST)
    assert len(report.layers) == 2
    for layer in report.layers:
        assert layer.error is not None and 0 <= layer.error < 5
        assert layer.output_scale > 0
        if opts.get("refine", "none") != "none":
            before, after = layer.info["refine_held_out_error"]
            assert after <= before + 1e-9  # the best held-out iterate is kept
    with torch.no_grad():
        out = report.model(torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(out).all()


def test_scale_fits_by_hand():
    from moeforge.convert.rescale import least_squares_scale, norm_matching_scale

    y = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert least_squares_scale(y, r) == pytest.approx((2 + 4) / 3)  # <y, r> / <r, r>
    assert norm_matching_scale(y, r) == pytest.approx(3.0 / ((2**0.5 + 1) / 2))  # mean ||y|| / mean ||r||
    shared = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert least_squares_scale(y, r, shared) == pytest.approx((1 + 3) / 3)


def test_fitted_scale_has_lower_error_than_norm_matching(tiny_llama):
    # same experts and router (same seed), only the scale rule differs: least squares is optimal
    base = dict(method="random", experts=4, top_k=1, **FAST)
    fit = moeforge.convert(tiny_llama, None, rescale="fit", **base)
    norm = moeforge.convert(tiny_llama, None, rescale="layerwise", **base)
    for a, b in zip(fit.layers, norm.layers):
        assert a.output_scale != pytest.approx(b.output_scale)
        assert a.error <= b.error + 1e-9


def test_activation_router_beats_random_router_on_layer_error(tiny_llama):
    base = dict(method="coactivation", experts=4, top_k=1, rescale="fit", **FAST)
    act = moeforge.convert(tiny_llama, None, gate_init="activation", **base)
    rnd = moeforge.convert(tiny_llama, None, gate_init="random", **base)
    assert act.mean_layer_error < rnd.mean_layer_error


def test_down_refit_is_least_squares_on_the_layer():
    """refine_down lowers the layer error, and with no ridge on all tokens it is the exact least-squares fit."""
    from moeforge.convert.config import ConvertConfig
    from moeforge.convert.methods import LayerCalibration, LayerContext, get_method
    from moeforge.convert.refine import _down_features, refine_down
    from moeforge.moe.config import MoEConfig

    g = torch.Generator().manual_seed(0)
    ffn = DenseFFN(torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g), torch.randn(8, 32, generator=g))
    x = torch.randn(400, 8, generator=g)
    y = ffn(x)
    ctx = LayerContext(0, ConvertConfig(method="random", experts=4, top_k=1), g, LayerCalibration(x=x, y=y))
    ex = get_method("random").build(ffn, ctx)
    moe = MoEConfig(hidden_size=8, expert_size=8, num_experts=4, top_k=1)
    router = torch.randn(4, 8, generator=g)
    z = _down_features(moe, ex, router, 2.0, x)
    d0 = torch.cat(list(ex.down), dim=1)
    res, new = refine_down(moe, ex, router, 2.0, x, y, ridges=(1e-9,))
    assert res.error_after < res.error_before
    d1 = torch.cat(list(new.down), dim=1)
    lstsq = torch.linalg.lstsq(z.double(), y.double()).solution.T.float()
    torch.testing.assert_close(z @ d1.T, z @ lstsq.T, atol=1e-3, rtol=1e-3)
    assert not torch.equal(d0, d1)


def test_calibration_sources(tiny_llama, tmp_path):
    tok = load_tokenizer(tiny_llama)
    w = calibration_windows(tok, "prose+code", 512, 64)
    assert w.shape == (8, 64)
    (tmp_path / "c.jsonl").write_text('{"text": "' + "hello world " * 100 + '"}\n')
    assert calibration_windows(tok, str(tmp_path / "c.jsonl"), 256, 64).shape == (4, 64)
    assert calibration_windows(tok, ["abc " * 100], 128, 64).shape == (2, 64)
    with pytest.raises(moeforge.MoeforgeError, match="neither a built-in domain"):
        calibration_windows(tok, "no-such-domain", 128, 64)
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)) * 20)
    with pytest.raises(moeforge.MoeforgeError, match="bin.txt is not UTF-8 text"):
        calibration_windows(tok, str(tmp_path / "bin.txt"), 128, 64)


def test_too_few_calibration_tokens_names_the_option(tiny_llama):
    from moeforge.errors import MoeforgeError

    tok = load_tokenizer(tiny_llama)
    with pytest.raises(MoeforgeError, match=r"calibration_tokens \(--calibration-tokens\) 10 is less than one calibration window of 64"):
        calibration_windows(tok, "prose", 10, 64)
    assert calibration_windows(tok, "prose", 128, 64).shape == (2, 64)


@pytest.mark.parametrize("router, options", [("topk", {}), ("noisy_topk", {"router_mlp": True})], ids=["topk", "noisy-mlp"])
def test_reported_layer_error_is_the_exported_layers(tiny_llama, router, options):
    """The calibration's simulated router is the exported one: its reported per-layer error equals the
    error of the converted MoE layer on the same calibration tokens (noisy top-k's router_mlp matrix
    included, which the simulation used to draw afresh)."""
    from moeforge.convert.routing_sim import relative_error

    report = moeforge.convert(tiny_llama, None, method="coactivation", experts=4, top_k=2, router=router,
                              router_options=options, gate_init="activation", rescale="fit", refine="down", **FAST)
    source = open_source(tiny_llama)
    runner = DenseRunner(source)
    h = runner.embed(calibration_windows(load_tokenizer(tiny_llama), None, FAST["calibration_tokens"],
                                         FAST["calibration_seq_len"]))
    model = report.model.eval()
    for i, layer_report in enumerate(report.layers):
        h, calib = runner.layer(i, h, DenseFFN(*source.read_ffn(i)))
        with torch.no_grad():
            out = model.model.layers[i].mlp(calib.x).hidden_states
        assert relative_error(calib.y, out) == pytest.approx(layer_report.error, rel=1e-4)


def test_importance_refuses_one_token_windows(tiny_llama):
    """One-token windows have no next-token loss; their importance would be all zero (meaningless experts)."""
    from moeforge.errors import MoeforgeError

    source = open_source(tiny_llama)
    windows = torch.randint(0, 256, (4, 1), generator=torch.Generator().manual_seed(1))
    with pytest.raises(MoeforgeError, match="at least 2 tokens"):
        importance_pass(DenseRunner(source), windows, 2, generator=torch.Generator().manual_seed(0),
                        read_ffn=lambda i: DenseFFN(*source.read_ffn(i)))


def test_a_calibration_text_shorter_than_asked_is_reported(tiny_llama, tmp_path):
    """Fewer tokens than --calibration-tokens (a short --calibration file) were used without a word."""
    (tmp_path / "short.txt").write_text("the cat sat on the mat. " * 40)
    lines: list[str] = []
    moeforge.convert(tiny_llama, None, method="random", experts=4, top_k=2, rescale="fit", eval_tokens=0,
                     calibration=str(tmp_path / "short.txt"), calibration_tokens=4096, calibration_seq_len=32,
                     progress=lines.append)
    line = next(m for m in lines if m.startswith("calibration:"))
    assert "the calibration text holds no more; --calibration-tokens asked for 4096" in line
    lines.clear()
    moeforge.convert(tiny_llama, None, method="random", experts=4, top_k=2, rescale="fit", eval_tokens=0,
                     calibration_tokens=256, calibration_seq_len=32, progress=lines.append)
    assert next(m for m in lines if m.startswith("calibration:")) == "calibration: 256 tokens in 8 windows of 32"
