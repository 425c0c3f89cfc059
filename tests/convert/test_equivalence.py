"""Degenerate conversions that must reproduce the dense model, through moeforge and plain transformers.

Renormalised top-k weights always sum to one, so "all experts active" equals the dense FFN only
when every expert gets the same weight and the output scale undoes it: a uniform router
(``gate_init="uniform"``) and ``rescale=E`` (with k = E each weight is exactly 1/E).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeforge

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def dense_logits(path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def plain_transformers_logits(directory, ids) -> torch.Tensor:
    """Load ``directory`` with AutoModelForCausalLM in a fresh interpreter that never imports moeforge."""
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, dtype=torch.float32).eval()
        ids = torch.tensor({ids.tolist()!r})
        with torch.no_grad():
            out = model(ids).logits
        assert not any(m.startswith("moeforge") for m in sys.modules), "moeforge was imported"
        print(json.dumps({{"cls": type(model).__name__, "logits": out.tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["cls"], torch.tensor(result["logits"])


def test_random_all_experts_reproduces_dense_via_load_and_plain_transformers(tiny_llama, tmp_path):
    out = tmp_path / "moe"
    report = moeforge.convert(tiny_llama, out, method="random", experts=4, top_k=4, gate_init="uniform",
                              rescale=4.0, eval_tokens=0)
    assert report.format == "mixtral"
    assert report.verification["loaded_with"] == "transformers"
    want = dense_logits(tiny_llama)
    moe = moeforge.load(out)
    assert type(moe).__name__ == "MoeforgeForCausalLM"
    torch.testing.assert_close(logits(moe), want, atol=1e-5, rtol=0)
    cls, got = plain_transformers_logits(out, IDS)
    assert cls == "MixtralForCausalLM"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the on-disk layout is the per-expert one transformers and vLLM read
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["intermediate_size"] == 16


def test_random_all_experts_in_memory_matches_dense(tiny_llama):
    report = moeforge.convert(tiny_llama, None, method="random", experts=4, top_k=4, gate_init="uniform",
                              rescale=4.0, eval_tokens=0)
    torch.testing.assert_close(logits(report.model), dense_logits(tiny_llama), atol=1e-5, rtol=0)


@pytest.mark.parametrize("router_init", ["random", "uniform"])
def test_upcycling_with_renormalised_topk_reproduces_dense(tiny_llama, router_init):
    # identical experts and weights summing to one: any router gives the dense output
    report = moeforge.convert(tiny_llama, None, method="upcycle", experts=4, top_k=2, gate_init=router_init,
                              eval_tokens=0)
    assert report.layers[0].output_scale == 1.0
    torch.testing.assert_close(logits(report.model), dense_logits(tiny_llama), atol=1e-5, rtol=0)


def test_granular_upcycling_with_virtual_groups_reproduces_dense(tiny_llama, tmp_path):
    # G = 2 parts, 4 experts, k = 2: the virtual-group router picks both parts of one replica
    out = tmp_path / "granular"
    report = moeforge.convert(tiny_llama, out, method="granular-upcycle", granularity=2, experts=4, top_k=2,
                              eval_tokens=0)
    assert report.layers[0].output_scale == 2.0  # Megatron-LM's scale G for renormalised top-k
    want = dense_logits(tiny_llama)
    torch.testing.assert_close(logits(moeforge.load(out)), want, atol=1e-5, rtol=0)


def test_split_at_lower_k_differs_from_dense(tiny_llama):
    # a check that can fail: with k < E the converted model is not the dense one
    report = moeforge.convert(tiny_llama, None, method="random", experts=4, top_k=1, eval_tokens=0)
    assert (logits(report.model) - dense_logits(tiny_llama)).abs().max() > 1e-2


def test_untied_checkpoint_and_bfloat16_output(tiny_llama_untied, tmp_path):
    out = tmp_path / "bf16"
    report = moeforge.convert(tiny_llama_untied, out, method="random", experts=2, top_k=2, gate_init="uniform",
                              rescale=2.0, dtype="bfloat16", eval_tokens=0)
    assert report.verification["max_abs_logit_diff"] <= 1e-3
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
