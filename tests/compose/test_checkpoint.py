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
