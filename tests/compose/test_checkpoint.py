"""Composition weights are saved alone and refused for other models."""

import json

import pytest
import torch
from safetensors import safe_open

from moeforge.compose import compose, load_composition
from moeforge.compose.checkpoint import model_fingerprint
from moeforge.errors import MoeforgeError

from .conftest import llama, randomize_outputs


def test_roundtrip_saves_composition_weights_only(saved_models, tmp_path):
    composed = randomize_outputs(compose(saved_models["anchor"], saved_models["augmenting"], num_connections=2))
    out = composed.save_trained(tmp_path / "calm")
    assert sorted(p.name for p in out.iterdir()) == ["composition.json", "composition.safetensors"]
    with safe_open(str(out / "composition.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(composed.composition_state_dict())
    assert all(k.startswith("connections.") for k in keys)
    again = load_composition(out)  # models found through the recorded sources
    ids = torch.randint(3, 40, (2, 8))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, composed(ids).logits)
    meta = json.loads((out / "composition.json").read_text())
    assert meta["layer_pairs"] == [[0, 1], [1, 3]] and meta["anchor"]["hidden_size"] == 64


def test_fingerprint_survives_bfloat16_but_not_other_weights():
    m = llama()
    assert model_fingerprint(m) == model_fingerprint(llama().to(torch.bfloat16))
    assert model_fingerprint(m) != model_fingerprint(llama(seed=5))


def test_weights_saved_for_other_models_refused(anchor, augmenting, tmp_path):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    composed.save_trained(tmp_path / "calm")
    other = compose(llama(seed=9), augmenting, num_connections=2)
    with pytest.raises(MoeforgeError, match="trained with the anchor model .* has different weights"):
        other.load_trained(tmp_path / "calm")
    other.load_trained(tmp_path / "calm", allow_other_models=True)  # explicit opt-in
    wider = compose(llama(hidden=32, heads=2), augmenting, num_connections=2)
    with pytest.raises(MoeforgeError, match=r"saved for the anchor model .*\(hidden size 64\).* has hidden size 32"):
        wider.load_trained(tmp_path / "calm")
    with pytest.raises(MoeforgeError, match="connects layers"):
        compose(anchor, augmenting, num_connections=1).load_trained(tmp_path / "calm")


def test_not_a_composition(tmp_path, anchor, augmenting):
    composed = compose(anchor, augmenting, num_connections=1)
    with pytest.raises(MoeforgeError, match="does not exist: it is not a CALM composition"):
        composed.load_trained(tmp_path / "missing")
    with pytest.raises(MoeforgeError, match="records no source for the anchor model"):
        composed.save_trained(tmp_path / "mem")
        load_composition(tmp_path / "mem")


@pytest.mark.parametrize("setting", [{"rope": False}, {"num_heads": 8}, {"norm": False}])
def test_weights_trained_with_other_settings_refused(anchor, augmenting, tmp_path, setting):
    """rope and num_heads leave every shape alone: the weights loaded silently and computed something else."""
    randomize_outputs(compose(anchor, augmenting, num_connections=2)).save_trained(tmp_path / "calm")
    other = compose(anchor, augmenting, num_connections=2, **setting)
    name = next(iter(setting))
    with pytest.raises(MoeforgeError, match=rf"was trained with {name}="):
        other.load_trained(tmp_path / "calm")
    compose(anchor, augmenting, num_connections=2, dropout=0.1).load_trained(tmp_path / "calm")  # training-only setting
    compose(anchor, augmenting, num_connections=2, num_heads=4).load_trained(tmp_path / "calm")  # the anchor's own count


def test_float16_copies_of_the_models_load_the_composition(saved_models, tmp_path):
    """float32 -> float16 -> bfloat16 rounds ~6% of values differently from float32 -> bfloat16, so the
    bfloat16-rounded fingerprint alone refused every float16 copy (`moeforge eval DIR --dtype float16`)."""
    composed = randomize_outputs(compose(saved_models["anchor"], saved_models["augmenting"], num_connections=2))
    composed.save_trained(tmp_path / "calm")
    for dtype in ("float16", "bfloat16"):
        again = load_composition(tmp_path / "calm", dtype=dtype)
        assert next(again.anchor.parameters()).dtype == getattr(torch, dtype)
    other = compose(llama(seed=9).half(), saved_models["augmenting"], num_connections=2)
    with pytest.raises(MoeforgeError, match="has different weights"):
        other.load_trained(tmp_path / "calm")


def test_sources_of_models_opened_from_relative_paths_are_absolute(saved_models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(saved_models["anchor"].parent)
    anchor = AutoModelForCausalLM.from_pretrained("anchor")  # config._name_or_path == "anchor"
    composed = randomize_outputs(compose(anchor, "augmenting", num_connections=2))
    assert composed.sources["anchor"] == str(saved_models["anchor"].resolve())
    composed.save_trained(tmp_path / "calm")
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded sources still open
    load_composition(tmp_path / "calm")
