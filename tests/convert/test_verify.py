"""The layer-by-layer logits check: float32 results from low-precision weights, one module at a time."""

import pytest
import torch

import moeforge
from moeforge.convert import verify
from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM


def _tiny_moeforge(dtype: torch.dtype, tied: bool) -> MoeforgeForCausalLM:
    torch.manual_seed(0)
    cfg = MoeforgeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied,
                         moe={"num_experts": 4, "top_k": 2, "expert_size": 16, "num_shared_experts": 1})
    return MoeforgeForCausalLM(cfg).eval().to(dtype)


def _tiny_mixtral(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("build", ["moeforge-tied", "moeforge-untied", "mixtral"])
def test_layerwise_logits_equal_the_float32_model(dtype, build):
    model = _tiny_mixtral(dtype) if build == "mixtral" else _tiny_moeforge(dtype, tied=build.endswith("-tied"))
    ids = torch.randint(300, (2, 12))
    with torch.no_grad():
        want = model.float()(ids).logits  # the same rounded weights, upcast as a whole
    model = model.to(dtype)  # back to the low-precision weights (float32 -> dtype is exact for them)
    embeds = model.get_input_embeddings().weight[ids]
    got = verify.layerwise_logits(model.base_model, embeds, model.get_output_embeddings().weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # the body was consumed module by module: its layers hold no weights any more
    assert all(p.numel() == 0 for p in model.base_model.layers.parameters())


def test_head_may_be_read_after_the_body_has_run():
    model = _tiny_moeforge(torch.bfloat16, tied=False)
    ids = torch.randint(300, (1, 8))
    with torch.no_grad():
        want = model.float()(ids).logits
    model = model.to(torch.bfloat16)
    head = model.lm_head.weight.detach().clone()
    seen = []

    def read_head():
        seen.append(all(p.numel() == 0 for p in model.model.layers.parameters()))
        return head

    got = verify.layerwise_logits(model.model, model.model.embed_tokens.weight[ids], read_head)
    assert seen == [True]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("fmt", "dtype", "options"), [
    ("qwen2_moe", "float16", {"experts": 3, "shared_experts": 1}),
    ("moeforge", "bfloat16", {"experts": 4, "router": "sigmoid_bias"}),
])
def test_first_layer_check_of_low_precision_exports(tiny_llama, tmp_path, fmt, dtype, options):
    report = moeforge.convert(tiny_llama, tmp_path / "out", top_k=2, format=fmt, dtype=dtype, eval_tokens=0,
                              verify="layers", **options)
    assert report.format == fmt and report.verification["whole_model"] is False
    assert report.verification["max_abs_logit_diff"] < 1e-4


def test_first_layer_check_of_a_float16_export_passes_and_catches_an_altered_expert(tiny_llama, tmp_path, monkeypatch):
    from moeforge.formats import EXPORTERS

    report = moeforge.convert(tiny_llama, tmp_path / "ok", experts=4, top_k=2, dtype="float16", eval_tokens=0,
                              verify="layers")
    assert report.verification["layers_compared"] == verify.VERIFY_LAYERS
    assert report.verification["max_abs_logit_diff"] < 1e-4

    exporter = EXPORTERS["mixtral"]
    original = type(exporter).ffn_tensors

    def altered(self, spec, i, weights):
        pairs = original(self, spec, i, weights)
        if i == 0:
            k = next(n for n, (key, _) in enumerate(pairs) if key.endswith("experts.1.w3.weight"))
            pairs[k] = (pairs[k][0], pairs[k][1] * 1.5)
        return pairs

    monkeypatch.setattr(type(exporter), "ffn_tensors", altered)
    with pytest.raises(moeforge.MoeforgeError, match="reloaded mixtral model's logits differ"):
        moeforge.convert(tiny_llama, tmp_path / "bad", experts=4, top_k=4, dtype="float16", eval_tokens=0, verify="layers")
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux only")
def test_released_file_pages_fault_back_with_the_same_values(tmp_path):
    from moeforge.utils.memory import release_file_pages

    path = tmp_path / "weights.bin"
    values = torch.randn(512, 1024)
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32).view(512, 1024)
    assert torch.equal(mapped, values)  # every page touched
    assert release_file_pages(tmp_path) >= values.numel() * 4
    assert release_file_pages(tmp_path / "elsewhere") == 0
    assert torch.equal(mapped, values)  # read again from the file
