"""Optional reference: our LoRA and (IA)^3 baselines against the Hugging Face ``peft`` library with the
same weights. ``peft`` is not a moeforge dependency; these tests skip when it is not installed."""

import pytest
import torch

from moeforge.peft import IA3Config, LoRAConfig, wrap

from .conftest import batch, make_model, randomize_adapters

hf_peft = pytest.importorskip("peft")


def _logits(model, inputs):
    """float64 logits: the two libraries order their sums differently (x A B vs (x A) B, scaling before
    or after), which in float32 differs by ~1e-5 on some CPUs (AVX2 vs AVX-512 kernels); in float64
    only a real difference survives the tight tolerance below."""
    with torch.no_grad():
        return model.double()(**inputs).logits


def test_lora_matches_hf_peft(kind):
    inputs = batch(kind)
    ours = wrap(make_model(kind), LoRAConfig(rank=2, alpha=8))
    randomize_adapters(ours)
    names = list(ours.adapter_layers())
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    theirs = hf_peft.get_peft_model(
        make_model(kind), hf_peft.LoraConfig(r=2, lora_alpha=8, lora_dropout=0.0, target_modules=short)
    )
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            module = theirs.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.lora_A[0].t())  # (r, in)
            module.lora_B["default"].weight.copy_(layer.lora_B[0].t())  # (out, r)
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), rtol=1e-9, atol=1e-9)


def test_ia3_matches_hf_peft(kind):
    inputs = batch(kind)
    ours = wrap(make_model(kind), IA3Config())
    randomize_adapters(ours)
    targets = ["k_proj", "v_proj", "down_proj"] if kind == "llama" else ["k", "v", "wo"]
    theirs = hf_peft.get_peft_model(
        make_model(kind), hf_peft.IA3Config(target_modules=targets, feedforward_modules=targets[2:])
    )
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            vector = theirs.base_model.model.get_submodule(name).ia3_l["default"]
            vector.copy_(layer.vectors[0].reshape(vector.shape))
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), rtol=1e-9, atol=1e-9)
