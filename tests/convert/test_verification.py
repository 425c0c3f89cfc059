"""Export verification fails loudly, and leaves nothing behind, when an exported tensor is altered."""

import pytest
import torch

import moeforge
from moeforge.convert import streaming
from moeforge.errors import MoeforgeError
from moeforge.formats import EXPORTERS


def test_tensor_altered_on_disk_after_writing_is_caught(tiny_llama, tmp_path, monkeypatch):
    original_close = streaming.ShardedWriter.close

    def close_then_corrupt(self):
        paths = original_close(self)
        raw = bytearray(paths[0].read_bytes())
        raw[-5] ^= 0x40  # flip one bit in the last tensor's data
        paths[0].write_bytes(bytes(raw))
        return paths

    monkeypatch.setattr(streaming.ShardedWriter, "close", close_then_corrupt)
    with pytest.raises(MoeforgeError, match="export verification failed: the bytes of tensor"):
        moeforge.convert(tiny_llama, tmp_path / "out", experts=4, top_k=2, eval_tokens=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "moeforge"])
def test_tensor_altered_before_writing_is_caught_by_the_logits_check(tiny_llama, tmp_path, monkeypatch, fmt):
    exporter = EXPORTERS[fmt]
    original = type(exporter).ffn_tensors

    def altered(self, spec, i, weights):
        pairs = original(self, spec, i, weights)
        if i == 0:  # perturb the first expert projection of layer 0 (every format writes one)
            k = next(n for n, (key, _) in enumerate(pairs) if "gate_up" in key or "w1" in key or "experts.0.gate" in key)
            key, t = pairs[k]
            pairs[k] = (key, t + 0.5)
        return pairs

    monkeypatch.setattr(type(exporter), "ffn_tensors", altered)
    with pytest.raises(MoeforgeError, match=f"reloaded {fmt} model's logits differ"):
        moeforge.convert(tiny_llama, tmp_path / "out", experts=4, top_k=4, format=fmt, eval_tokens=0)
    assert list(tmp_path.iterdir()) == []


def test_verification_of_the_first_layers_only(tiny_llama, tmp_path, monkeypatch):
    # models too large to hold twice are verified on their first layers, reloaded from the same files
    from moeforge.convert import verify

    monkeypatch.setattr(verify, "VERIFY_LAYERS", 1)
    report = moeforge.convert(tiny_llama, tmp_path / "out", experts=4, top_k=2, eval_tokens=256, verify="layers")
    assert report.verification["layers_compared"] == 1 and report.verification["whole_model"] is False
    assert report.verification["tensors_checked"] > 0
    assert report.perplexity is None  # no whole model in memory to evaluate
    assert (tmp_path / "out" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # reference spill and truncated-config dirs are gone
    torch.testing.assert_close(report.verification["max_abs_logit_diff"], 0.0, atol=1e-4, rtol=0)


def test_first_layers_check_reaches_the_first_converted_layer(tiny_llama, tmp_path, monkeypatch):
    """With --layers 1 the first-layer check compared layer 0, which is kept dense: an export whose
    only MoE block was wrong passed verification."""
    from moeforge.convert import verify

    monkeypatch.setattr(verify, "VERIFY_LAYERS", 1)
    report = moeforge.convert(tiny_llama, tmp_path / "ok", experts=4, top_k=2, layers=[1], eval_tokens=0, verify="layers")
    assert report.verification["layers_compared"] == 2
    exporter = EXPORTERS["qwen2_moe"]
    original = type(exporter).ffn_tensors

    def altered(self, spec, i, weights):
        pairs = original(self, spec, i, weights)
        if i == 1:
            key, t = pairs[1]  # the first expert's gate_proj of the MoE layer
            pairs[1] = (key, t + 0.5)
        return pairs

    monkeypatch.setattr(type(exporter), "ffn_tensors", altered)
    with pytest.raises(MoeforgeError, match="reloaded qwen2_moe model's logits differ"):
        moeforge.convert(tiny_llama, tmp_path / "bad", experts=4, top_k=4, layers=[1], eval_tokens=0, verify="layers")
    assert not (tmp_path / "bad").exists()


def test_checking_a_qwen2_moe_export_without_shared_experts_warns_nothing(tiny_llama, tmp_path):
    """Reloading the export printed torch's 'Initializing zero-element tensors is a no-op' (from its
    zero-width shared expert) in the middle of `moeforge convert`'s output."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = moeforge.convert(tiny_llama, tmp_path / "out", experts=4, top_k=2, layers=[1], eval_tokens=0)
    assert report.format == "qwen2_moe"
    assert [str(w.message) for w in caught if "zero-element" in str(w.message)] == []
