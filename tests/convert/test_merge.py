"""--method merge (experts = FFNs of several dense models) and --gate-init domain, against references."""

import json

import pytest
import torch

import moeforge
from moeforge.cli import main
from moeforge.convert.gate_init import domain_rows
from moeforge.errors import MoeforgeError

from .tiny import byte_tokenizer, make_dense


def _variant(base_dir, path, seed: int, *, ffn_only: bool = True):
    """A "fine-tune" of the tiny base: its FFNs (or every weight) moved by noise of std 0.02 (weights have 0.1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name or not ffn_only:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_dense(root / "base")
    a = _variant(root / "base", root / "a", 1)
    b = _variant(root / "base", root / "b", 2)
    c = _variant(root / "base", root / "c", 3, ffn_only=False)
    return {"root": root, "base": base, "a": a, "b": b, "c": c}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_uniform_router_over_all_experts_equals_the_mean_of_the_expert_ffns(family):
    """k = E, uniform router: each MoE layer is (1/3) sum_e FFN_e, i.e. one dense SwiGLU of width 3I whose
    gate/up rows are the experts' stacked and whose down projection is theirs stacked / 3."""
    from transformers import AutoModelForCausalLM

    root = family["root"]
    report = moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / n) for n in "abc"],
                              top_k=3, gate_init="uniform", eval_tokens=0)
    assert report.config.experts == 3  # one per expert model when --experts is left out
    base = family["base"]
    config = base.config.to_dict()
    config.update(intermediate_size=3 * base.config.intermediate_size)
    config.pop("architectures", None)
    wide = AutoModelForCausalLM.from_config(type(base.config)(**config)).eval()
    state = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
    for i in range(base.config.num_hidden_layers):
        mlps = [family[n].model.layers[i].mlp for n in "abc"]
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = torch.cat([m.gate_proj.weight for m in mlps])
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.cat([m.up_proj.weight for m in mlps])
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.cat([m.down_proj.weight for m in mlps], dim=1) / 3
    missing, unexpected = wide.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    wide.tie_weights()
    torch.testing.assert_close(_logits(report.model, IDS), _logits(wide, IDS), atol=1e-5, rtol=1e-5)


def test_merging_copies_of_the_base_reproduces_the_base(family):
    root = family["root"]
    report = moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / "base")] * 4,
                              top_k=2, eval_tokens=0)
    torch.testing.assert_close(_logits(report.model, IDS), _logits(family["base"], IDS), atol=1e-5, rtol=1e-5)


def test_each_expert_is_its_models_ffn_and_the_rest_is_the_base(family):
    root = family["root"]
    moe = moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / "a"), str(root / "c")],
                           top_k=1, eval_tokens=0).model
    for i, layer in enumerate(moe.model.layers):
        for e, name in enumerate("ac"):
            mlp = family[name].model.layers[i].mlp
            want = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            torch.testing.assert_close(layer.mlp.experts.gate_up_proj[e], want, atol=0, rtol=0)
            torch.testing.assert_close(layer.mlp.experts.down_proj[e], mlp.down_proj.weight, atol=0, rtol=0)
        # c changed its attention too, but --merge-shared base keeps the input model's
        torch.testing.assert_close(layer.self_attn.q_proj.weight, family["base"].model.layers[i].self_attn.q_proj.weight,
                                   atol=0, rtol=0)


def test_merge_shared_average_takes_the_mean_of_the_expert_models(family):
    root = family["root"]
    moe = moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / "a"), str(root / "c")],
                           merge_shared="average", top_k=1, eval_tokens=0).model
    a, c = family["a"], family["c"]
    want = (a.model.embed_tokens.weight + c.model.embed_tokens.weight) / 2
    torch.testing.assert_close(moe.model.embed_tokens.weight, want)
    for i, layer in enumerate(moe.model.layers):
        for key in ("q_proj", "o_proj"):
            want = (getattr(a.model.layers[i].self_attn, key).weight + getattr(c.model.layers[i].self_attn, key).weight) / 2
            torch.testing.assert_close(getattr(layer.self_attn, key).weight, want)
        want = (a.model.layers[i].input_layernorm.weight + c.model.layers[i].input_layernorm.weight) / 2
        torch.testing.assert_close(layer.input_layernorm.weight, want)


DIGITS = ";".join(str(n * 7919 % 100003) + "+" + str(n) for n in range(400))  # no character in common with LETTERS
_WORDS = "the quick brown fox jumps over a lazy dog while bird sings in green field and river runs".split()
LETTERS = " ".join(_WORDS[n * 7 % 101 % len(_WORDS)] for n in range(900))


def test_domain_rows_separate_labelled_inputs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 2
    labels = torch.arange(3).repeat_interleave(200)
    x = centres[labels] + torch.randn(600, 16, generator=g)
    rows, acc = domain_rows(x, labels, 3)
    assert rows.shape == (3, 16) and rows.dtype == torch.float32
    assert acc > 0.95
    # the rows generalise: fresh points from the same clusters go to their own expert
    test = centres[labels] + torch.randn(600, 16, generator=g)
    assert float(((test @ rows.T).argmax(1) == labels).float().mean()) > 0.9
    with pytest.raises(MoeforgeError, match=r"expert\(s\) \[2\] have no calibration tokens"):
        domain_rows(x[:400], labels[:400], 3)


def test_domain_gate_init_sends_each_text_to_its_expert_and_exports_to_mixtral(family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root = family["root"]
    (tmp_path / "digits.txt").write_text(DIGITS)
    (tmp_path / "letters.txt").write_text(LETTERS)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(root / "base"), "--out", str(out), "--method", "merge", "--expert-model", str(root / "a"),
              "--expert-model", str(root / "b"), "--top-k", "1", "--gate-init", "domain",
              "--expert-data", str(tmp_path / "digits.txt"), "--expert-data", str(tmp_path / "letters.txt"),
              "--calibration-tokens", "2048", "--calibration-seq-len", "128", "--eval-tokens", "0", "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    record = json.loads((out / "moeforge_conversion.json").read_text())
    assert record["format"] == "mixtral"
    assert record["config"]["expert_models"] == [str(root / "a"), str(root / "b")]
    assert all(layer["info"]["domain_accuracy"] > 0.9 for layer in record["layers"])
    # plain transformers opens it; held-out text of each domain (the files' tails: the calibration read
    # 1,024 tokens from each file's start) goes to its own expert in every layer
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(plain).__name__ == "MixtralForCausalLM"
    moe = moeforge.load(out)
    tok = byte_tokenizer()
    assert len(DIGITS) > 3000 and len(LETTERS) > 3000
    for expert, text in ((0, DIGITS[-300:]), (1, LETTERS[-300:])):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            routing = moe(ids, output_routing=True).routing
        for r in routing:  # past the first tokens, whose context is too short to tell (windows start rarely)
            share = float((r.expert_index[8:] == expert).float().mean())
            assert share > 0.8, (expert, share)


def test_merge_refusals(family, tmp_path):
    root = family["root"]
    models = [str(root / "a"), str(root / "b")]
    cases = [
        (dict(method="merge"), "--method merge needs the models"),
        (dict(method="merge", expert_models=models, experts=4), r"2 model\(s\) for --experts 4"),
        (dict(method="random", expert_models=models), "--expert-model names the models"),
        (dict(method="merge", expert_models=models, refine="down"), "--refine down cannot be used with --method merge"),
        (dict(method="merge", expert_models=models, gate_init="activation"), "--gate-init activation cannot"),
        (dict(method="merge", expert_models=models, rescale="fit"), "--rescale fit cannot"),
        (dict(method="merge", expert_models=models, gate_init="domain"), "needs one --expert-data text per expert"),
        (dict(method="merge", expert_models=models, gate_init="domain", expert_data=["prose"]),
         "per expert \\(2\\), got 1"),
        (dict(method="merge", expert_models=models, expert_data=["prose", "code"]), "Add --gate-init domain"),
        (dict(method="random", gate_init="domain", expert_data=["prose", "code"], experts=2), "only means something"),
        (dict(method="merge", expert_models=[]), "must be a non-empty list"),
        (dict(method="merge", expert_models=models, merge_shared="mean"), "unknown merge_shared setting 'mean'"),
        (dict(method="merge", expert_models=models, gate_init="domain", expert_data=["prose", "code"],
              calibration="prose"), "--calibration is not read with --gate-init domain"),
    ]
    for options, match in cases:
        with pytest.raises(MoeforgeError, match=match):
            moeforge.ConvertConfig(**options)


def test_an_expert_model_of_another_shape_is_refused_and_nothing_is_written(family, tmp_path, capsys):
    root = family["root"]
    make_dense(tmp_path / "wide", hidden=48)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(root / "base"), "--out", str(out), "--method", "merge", "--expert-model", str(root / "a"),
              "--expert-model", str(tmp_path / "wide"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "has hidden_size = 48, but the input model" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(root / "base"), "--out", str(out), "--method", "merge", "--expert-model", str(root / "a"),
              "--expert-model", str(tmp_path / "missing"), "--quiet"])
    assert exc.value.code == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("router, options", [("switch", {}), ("sigmoid_bias", {"normalize_weights": False})])
def test_domain_router_with_raw_weights_is_scaled_by_its_own_weight_sum(family, tmp_path, router, options):
    """Raw (unrenormalised) weights: the uniform-router factor E/k would double a confident domain router's
    output; merging copies of the base must stay close to the base on each domain's held-out text."""
    root = family["root"]
    (tmp_path / "digits.txt").write_text(DIGITS)
    (tmp_path / "letters.txt").write_text(LETTERS)
    report = moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / "base")] * 2, top_k=1,
                              router=router, gate_init="domain", expert_data=[str(tmp_path / "digits.txt"),
                                                                              str(tmp_path / "letters.txt")],
                              calibration_tokens=2048, calibration_seq_len=128, eval_tokens=0, **options)
    for layer in report.layers:
        assert layer.output_scale == pytest.approx(1 / layer.info["routed_weight_sum"])
    tok = byte_tokenizer()
    for text in (DIGITS[-300:], LETTERS[-300:]):
        ids = tok(text, return_tensors="pt").input_ids
        got, want = _logits(report.model, ids), _logits(family["base"], ids)
        assert float((got - want).norm() / want.norm()) < 0.1


def test_overwrite_never_deletes_an_expert_model(family, tmp_path):
    import shutil

    root = family["root"]
    out = tmp_path / "mix"
    moeforge.convert(root / "base", out, method="merge", expert_models=[str(root / "a"), str(root / "b")], top_k=1,
                     eval_tokens=0)
    shutil.copytree(root / "a", out / "ft-a")
    with pytest.raises(MoeforgeError, match="holds --expert-model"):
        moeforge.convert(root / "base", out, overwrite=True, method="merge",
                         expert_models=[str(out / "ft-a"), str(root / "b")], top_k=1, eval_tokens=0)
    assert (out / "ft-a" / "config.json").is_file()


def test_dtype_float32_keeps_float32_experts_and_the_exact_average(family, tmp_path):
    """A bfloat16 input model with float32 fine-tunes, --dtype float32: the experts are not rounded
    through bfloat16, nor is the mean of bfloat16 models under --merge-shared average."""
    from safetensors.torch import load_file

    root = family["root"]
    make_dense(tmp_path / "half", dtype=torch.bfloat16)
    _variant(tmp_path / "half", tmp_path / "half-c", 3, ffn_only=False)
    moe = moeforge.convert(tmp_path / "half", None, method="merge", expert_models=[str(root / "a"), str(root / "c")],
                           top_k=1, dtype="float32", eval_tokens=0).model
    a = load_file(str(root / "a" / "model.safetensors"))
    torch.testing.assert_close(moe.model.layers[0].mlp.experts.down_proj[0], a["model.layers.0.mlp.down_proj.weight"],
                               atol=0, rtol=0)
    moe = moeforge.convert(tmp_path / "half", None, method="merge", merge_shared="average", top_k=1, dtype="float32",
                           expert_models=[str(tmp_path / "half"), str(tmp_path / "half-c")], eval_tokens=0).model
    x, y = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("half", "half-c"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert x[key].dtype == torch.bfloat16
    torch.testing.assert_close(moe.model.layers[0].self_attn.q_proj.weight, (x[key].float() + y[key].float()) / 2,
                               atol=0, rtol=0)


def test_other_rope_settings_are_refused_for_average_and_noted_for_base(family, tmp_path):
    root = family["root"]
    make_dense(tmp_path / "long", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    models = [str(root / "a"), str(tmp_path / "long")]
    with pytest.raises(MoeforgeError, match="rope_parameters.*--merge-shared average would average"):
        moeforge.convert(root / "base", None, method="merge", expert_models=models, merge_shared="average", top_k=1,
                         eval_tokens=0)
    notes = []
    moeforge.convert(root / "base", None, method="merge", expert_models=models, top_k=1, eval_tokens=0,
                     progress=notes.append)
    assert any("note: --expert-model" in n and "rope_parameters" in n for n in notes)


def test_loaded_models_can_be_merged_and_are_recorded_by_name(family, tmp_path):
    from transformers import AutoModelForCausalLM

    root = family["root"]
    a = AutoModelForCausalLM.from_pretrained(str(root / "a"))
    out = tmp_path / "mix"
    report = moeforge.convert(root / "base", out, method="merge", expert_models=[a, str(root / "b")], top_k=1,
                              eval_tokens=0)
    assert report.config.to_dict()["expert_models"] == [f"<LlamaForCausalLM from {root / 'a'}>", str(root / "b")]
    record = json.loads((out / "moeforge_conversion.json").read_text())
    assert record["config"]["expert_models"][0].startswith("<LlamaForCausalLM")
    moe = moeforge.load(out)
    torch.testing.assert_close(moe.model.layers[1].mlp.experts.down_proj[0], a.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(MoeforgeError, match="paths, aliases or loaded models"):
        moeforge.ConvertConfig(method="merge", expert_models=[object()])


def test_domain_progress_lines_report_how_well_the_router_tells_the_texts_apart(family, tmp_path):
    root = family["root"]
    (tmp_path / "digits.txt").write_text(DIGITS)
    lines = []
    moeforge.convert(root / "base", None, method="merge", expert_models=[str(root / "a"), str(root / "b")], top_k=1,
                     gate_init="domain", expert_data=[str(tmp_path / "digits.txt")] * 2, calibration_tokens=1024,
                     calibration_seq_len=128, eval_tokens=0, progress=lines.append)
    reported = [line for line in lines if "router tells the domains apart on" in line]
    assert len(reported) == 2  # one per layer; identical texts cannot be told apart (about chance, 50%)
    assert all(int(line.split("apart on ")[1].split("%")[0]) <= 60 for line in reported)

