"""The PNG plots and the HTML token view are produced, non-empty, and show what they claim."""

import json
import re

import matplotlib.image as mpimg
import pytest
import torch

from moeforge.analysis.html import TokenRouting, capture_token_routing, routing_html, write_routing_html
from moeforge.analysis.plots import choose_layers, plot_curves, plot_domain_usage, plot_load_heatmap
from moeforge.analysis.stats import RoutingStats

from ..eval.tiny import tiny_moe, tiny_tokenizer


def routed_stats(model, seed):
    g = torch.Generator().manual_seed(seed)
    stats = RoutingStats()
    with torch.no_grad():
        stats.update(model(torch.randint(0, 300, (2, 20), generator=g), output_routing=True).routing)
    return stats


def assert_png(path, min_bytes=5000):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    img = mpimg.imread(str(path))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_load_heatmap_and_domain_usage(tmp_path):
    model = tiny_moe()
    per_domain = {"prose": routed_stats(model, 0), "code": routed_stats(model, 1)}
    overall = per_domain["prose"].merge(per_domain["code"])
    assert_png(plot_load_heatmap(overall, tmp_path / "load.png"))
    assert_png(plot_domain_usage(per_domain, tmp_path / "domains.png"))
    assert_png(plot_curves({"a": ([0, 1, 2], [30, 20, 15])}, tmp_path / "c.png", xlabel="tokens", ylabel="ppl",
                           hlines={"dense": 12.0}), min_bytes=2000)
    with pytest.raises(ValueError):
        plot_load_heatmap(RoutingStats(), tmp_path / "empty.png")


def test_choose_layers_spreads_and_keeps_ends():
    assert choose_layers(list(range(30)), 6) == [0, 6, 12, 17, 23, 29]
    assert choose_layers([1, 3], 6) == [1, 3]


def test_html_shows_every_token_and_layer(tmp_path):
    model, tok = tiny_moe(experts=8), tiny_tokenizer()
    text = "x = 1 < 2 and </script> 'quoted' & more"
    seg = capture_token_routing(model, tok, text, label="code <demo>", max_tokens=12)
    assert seg.layers == [0, 2]
    assert "".join(seg.tokens) == tok.decode(tok(text).input_ids[:12])
    path = write_routing_html(tmp_path / "r.html", [seg], title="t", num_experts=8)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and len(page) > 2000
    assert "http://" not in page and "https://" not in page  # self-contained
    visible = page.split('<script type="application/json"')[0]
    assert "code &lt;demo&gt;" in visible and "<demo>" not in visible  # escaped in the markup
    assert "</script> 'quoted'" not in page  # cannot close the data block early
    payload = re.search(r'<script type="application/json" id="routing-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(payload.replace("<\\/", "</"))
    assert data["segments"][0]["tokens"] == seg.tokens
    # one grid row per MoE layer, one cell per token; the cell number is the top expert
    rows = re.findall(r'<tr><th class="layer">(\d+)</th>(.*?)</tr>', page)
    assert [int(r[0]) for r in rows] == [0, 2]
    for (layer, cells), assign in zip(rows, seg.assignments):
        numbers = re.findall(r"<td [^>]*>(\d+)</td>", cells)
        assert [int(n) for n in numbers] == [pairs[0][0] for pairs in assign]
    # the JSON carries top-2 pairs per token, weights summing to one (renormalised top-k)
    for row in data["segments"][0]["assignments"]:
        for pairs in row:
            assert len(pairs) == 2 and sum(w for _, w in pairs) == pytest.approx(1.0, abs=1e-3)


def test_html_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        TokenRouting("x", ["a", "b"], [0], [[[(0, 1.0)]]])
    with pytest.raises(ValueError):
        routing_html([])


def test_domain_usage_panels_share_one_colour_scale(tmp_path, monkeypatch):
    import moeforge.analysis.plots as plots

    made = []
    real = plots._relative_norm
    monkeypatch.setattr(plots, "_relative_norm", lambda vmax: made.append(vmax) or real(vmax))
    model = tiny_moe()
    per_domain = {"prose": routed_stats(model, 0), "code": routed_stats(model, 1)}
    plot_domain_usage(per_domain, tmp_path / "d.png", layers=[0, 2])
    loads = [per_domain[d].load(layer).double() for layer in (0, 2) for d in per_domain]
    assert made == [pytest.approx(max(float((v * v.numel() / v.sum()).max()) for v in loads))]


def test_html_view_stops_at_the_model_context():
    model, tok = tiny_moe(), tiny_tokenizer()  # max_position_embeddings 256
    text = "def f(x):\n    return x + 1\n" * 200
    assert len(tok(text, add_special_tokens=False).input_ids) > 1000
    seg = capture_token_routing(model, tok, text, max_tokens=1000)
    assert len(seg.tokens) == 256
