"""`moeforge train` with a `compose:` section trains the connections only and saves them alone."""

import json

import pytest
import torch

from moeforge.compose import ComposedForCausalLM, load_composition
from moeforge.compose.kv_task import KVTable

trainer = pytest.importorskip("moeforge.train.trainer")


def test_trainer_trains_a_composition(saved_models, tmp_path):
    table = KVTable.generate(40, seed=0)
    data = tmp_path / "kv.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in table.sample("kv_arithmetic", 64, keys=table.train_keys)))
    config = {
        "model": str(saved_models["anchor"]),
        "output_dir": str(tmp_path / "run"),
        "data": [{"name": "kv", "path": str(data), "prompt_field": "prompt", "response_field": "answer"}],
        "steps": 3, "batch_size": 8, "seq_len": 24, "lr": 1e-2, "warmup_steps": 0,
        "progress": False, "plots": False,
        "compose": {"augmenting": str(saved_models["augmenting"]), "num_connections": 2},
    }
    result = trainer.train(config)
    model = result.model
    assert isinstance(model, ComposedForCausalLM)
    assert all(p.requires_grad == n.startswith("connections.") for n, p in model.named_parameters())
    files = {p.name for p in result.final_dir.iterdir()}
    assert {"composition.json", "composition.safetensors"} <= files and "model.safetensors" not in files
    again = load_composition(result.final_dir)
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
        assert not torch.allclose(again(ids).logits, again.anchor(ids).logits)  # the connections trained
