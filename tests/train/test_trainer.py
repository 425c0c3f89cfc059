"""End-to-end training on tiny models: outputs, mixture wiring, what trains, distillation, wrappers."""

import json
import sys
import types

import pytest
import torch
from safetensors import safe_open

import moeforge
from moeforge.errors import MoeforgeError
from moeforge.train import dynamic_update, read_metrics, train
from moeforge.train.checkpoint import list_checkpoints

from .tiny import save_tiny, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def _ckpt_keys(path):
    with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_cpt_and_sft_mixture_end_to_end(tmp_path, make_cfg, tokenizer):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        "".join(json.dumps({"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}) + "\n" for a in range(40))
    )
    cfg = make_cfg(
        data=[
            {"name": "prose", "builtin": "prose", "weight": 0.6, "max_tokens": 3000},
            {"name": "gsm", "path": str(gsm), "prompt_field": "question", "response_field": "answer", "weight": 0.4, "valid_fraction": 0.1},
        ],
        mixture={"type": "dynamic", "update_every": 3, "eval_tokens": 256},
        keep_last=2,
        plots=True,
    )
    result = train(cfg)
    out = result.output_dir
    assert result.steps == 6 and result.resumed_from is None
    records = read_metrics(out)
    assert all("step" in r and "loss" in r for r in records)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    for r in train_recs:
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        assert set(r["domain_loss"]) <= {"prose", "gsm"}
        assert len(r["expert_load"]) == 2  # both layers are MoE
        for fractions in r["expert_load"].values():
            assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0)
        assert r["aux_losses"]["balance_loss"] > 0 and r["tokens_per_s"] > 0
    # the dynamic updates: the recorded weights follow the formula from the recorded losses
    evals = [r for r in records if r["kind"] == "eval" and not r.get("final")]
    assert [r["step"] for r in evals] == [3, 6]
    assert [r["step"] for r in records if r.get("final")] == [6]  # and the end-of-run evaluation
    before = [0.6, 0.4]
    for ev in evals:
        names = list(ev["weights"])
        expect = dynamic_update(before, [ev["eval"][n] for n in names], [ev["reference"][n] for n in names], eta=1.0, c=1e-4)
        assert list(ev["weights"].values()) == pytest.approx(expect, abs=1e-9)
        before = expect
    # reference = the model's own initial validation loss (no reference model named)
    assert evals[0]["reference"]["gsm"] > evals[0]["eval"]["gsm"]
    for name in ("loss.png", "domain_loss.png", "domain_weights.png", "expert_load.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    assert not list((out / "checkpoints").glob(".*"))
    # the final model reloads and computes the same logits as the trained model in memory
    reloaded = moeforge.load(out / "final")
    ids = torch.randint(0, len(tokenizer), (1, 10))
    result.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)
    # rerunning a finished job does not train again
    again = train(cfg)
    assert again.resumed_from == 6 and again.steps == 6
    assert [r for r in read_metrics(out) if r["kind"] == "train"] == train_recs


def test_reference_model_losses(tmp_path, make_cfg, tokenizer):
    ref_dir = save_tiny(tmp_path / "ref", tokenizer, seed=5)
    cfg = make_cfg(steps=2, mixture={"type": "dynamic", "update_every": 2, "reference_model": str(ref_dir), "eval_tokens": 128}, save_every=100)
    result = train(cfg)
    ev = [r for r in result.history if r["kind"] == "eval"][0]
    # independently: the reference model's own lm_loss on the first 128 validation tokens (4 blocks of 32)
    from moeforge.data.dataset import build_domain
    from moeforge.train.config import load_config

    ref = moeforge.load(ref_dir)
    c = load_config(cfg)
    for src in c.data:
        dom = build_domain(src, tokenizer, seq_len=32, cache_dir=cfg["cache_dir"], valid_max_tokens=256)
        ids, labels = dom.valid.batch(list(range(4)))  # the 4 full blocks of 32 that make 128 tokens
        out = ref(input_ids=ids, labels=labels)
        assert ev["reference"][src.name] == pytest.approx(out.lm_loss.item(), rel=1e-5)


@pytest.mark.parametrize("what", ["router", "moe"])
def test_train_params_selects_what_changes_and_what_is_saved(tmp_path, make_cfg, tokenizer, what):
    model = tiny_model(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(make_cfg(steps=2, train_params=what), model=model, tokenizer=tokenizer)
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    routers = {f"model.layers.{i}.mlp.router.weight" for i in range(2)}
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    expected = routers if what == "router" else routers | experts
    assert changed == expected
    assert _ckpt_keys(list_checkpoints(result.output_dir)[-1][1]) == expected


def test_sigmoid_bias_router_biases_move_and_are_checkpointed(tmp_path, make_cfg, tokenizer):
    model = tiny_model(len(tokenizer), moe={"num_experts": 4, "top_k": 2, "expert_size": 16, "router": "sigmoid_bias", "bias_update_rate": 0.01})
    result = train(make_cfg(steps=3, train_params="router"), model=model, tokenizer=tokenizer)
    biases = [m.mlp.router.bias for m in result.model.model.layers]
    assert all(b.abs().sum() > 0 for b in biases)  # update_router_biases ran after the steps
    keys = _ckpt_keys(list_checkpoints(result.output_dir)[-1][1])
    assert {f"model.layers.{i}.mlp.router.bias" for i in range(2)} <= keys


def test_distillation_from_identical_and_different_teacher(tmp_path, make_cfg, tokenizer, tiny_dir):
    same = train(make_cfg(steps=1, distill={"teacher": str(tiny_dir), "weight": 0.5}, output_dir=str(tmp_path / "a")))
    assert same.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 starts from the teacher's weights
    other = save_tiny(tmp_path / "teacher", tokenizer, seed=3)
    res = train(make_cfg(steps=6, lr=1e-2, distill={"teacher": str(other), "weight": 1.0, "temperature": 2.0}, output_dir=str(tmp_path / "b")))
    kls = [r["kl"] for r in res.history if r["kind"] == "train"]
    assert kls[0] > 0.01 and kls[-1] < kls[0]


def test_peft_and_compose_sections_call_the_wrappers(tmp_path, make_cfg, tokenizer, monkeypatch):
    calls = {}

    def wrap_from_config(model, section):
        calls["peft"] = section
        for p in model.parameters():
            p.requires_grad_(False)
        model.model.layers[0].mlp.router.weight.requires_grad_(True)

        def save_trained(directory):
            directory.mkdir(parents=True, exist_ok=True)  # the trainer hands an empty temporary folder
            (directory / "adapter.json").write_text(json.dumps(section))

        model.save_trained = save_trained
        return model

    monkeypatch.setitem(sys.modules, "moeforge.peft", types.SimpleNamespace(wrap_from_config=wrap_from_config))
    section = {"method": "molora", "num_experts": 2, "rank": 2}
    res = train(make_cfg(steps=2, peft=section))
    assert calls["peft"] == section
    assert _ckpt_keys(list_checkpoints(res.output_dir)[-1][1]) == {"model.layers.0.mlp.router.weight"}
    assert json.loads((res.final_dir / "adapter.json").read_text()) == section
    assert not (res.final_dir / "model.safetensors").exists()


def test_batch_layout_errors(make_cfg):
    with pytest.raises(MoeforgeError, match="does not divide"):
        train(make_cfg(batch_size=4, micro_batch_size=3))


def test_tokenizer_model_mismatch(tmp_path, make_cfg, tokenizer):
    small = tiny_model(100)  # vocabulary smaller than the tokenizer's ids
    with pytest.raises(MoeforgeError, match="does not belong to this model"):
        train(make_cfg(steps=1), model=small, tokenizer=tokenizer)


def test_missing_and_empty_data_files(tmp_path, make_cfg):
    with pytest.raises(MoeforgeError, match="does not exist"):
        train(make_cfg(data=[{"name": "x", "path": str(tmp_path / "nope.txt")}]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoeforgeError, match="is empty"):
        train(make_cfg(data=[{"name": "x", "path": str(tmp_path / "empty.txt")}]))


def test_gradient_checkpointing_same_losses_and_bf16_autocast_runs(tmp_path, make_cfg):
    plain = train(make_cfg(steps=2, output_dir=str(tmp_path / "p")))
    ckpt = train(make_cfg(steps=2, gradient_checkpointing=True, output_dir=str(tmp_path / "g")))
    a = [r["loss"] for r in plain.history if r["kind"] == "train"]
    b = [r["loss"] for r in ckpt.history if r["kind"] == "train"]
    assert b == pytest.approx(a, abs=1e-6)
    def checkpointing(m):  # transformers renamed gradient -> activation checkpointing during 5.x
        return getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing

    assert checkpointing(ckpt.model) and not checkpointing(plain.model)
    bf16 = train(make_cfg(steps=2, precision="bf16", output_dir=str(tmp_path / "b")))
    c = [r["loss"] for r in bf16.history if r["kind"] == "train"]
    assert c == pytest.approx(a, abs=0.05) and c != a  # autocast really ran in bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


def test_cpu_training_takes_the_block_attention_with_the_same_losses(tmp_path, make_cfg):
    blocked = train(make_cfg(steps=2, output_dir=str(tmp_path / "a")))
    sdpa = train(make_cfg(steps=2, attention="model", output_dir=str(tmp_path / "m")))
    assert blocked.model.config._attn_implementation == "moeforge"
    assert sdpa.model.config._attn_implementation == "sdpa"
    a = [r["loss"] for r in blocked.history if r["kind"] == "train"]
    b = [r["loss"] for r in sdpa.history if r["kind"] == "train"]
    assert a == pytest.approx(b, abs=1e-5)


def test_sft_padding_reaches_the_moe_layers_as_a_token_mask(tmp_path, make_cfg, monkeypatch):
    # right-padded chat rows: the trainer passes the padding to the MoE layers, which do not route it
    from moeforge.moe.layer import MoELayer

    seen = []
    real_forward = MoELayer.forward

    evaluated = []

    def spy(self, hidden_states, token_mask=None):
        mask = None if token_mask is None else token_mask.detach().clone()
        (seen if torch.is_grad_enabled() else evaluated).append(mask)  # validation runs without grad
        return real_forward(self, hidden_states, token_mask=token_mask)

    monkeypatch.setattr(MoELayer, "forward", spy)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"q": f"{a} times 3?", "a": f"{3 * a}" * (1 + a % 5)}) + "\n" for a in range(30)))
    cfg = make_cfg(steps=2, batch_size=4, micro_batch_size=4, eval_tokens=4096, seq_len=48, data=[{"name": "chat", "path": str(chat), "prompt_field": "q",
                                                   "response_field": "a", "valid_fraction": 0.2}])
    train(cfg)
    masks = [m for m in seen if m is not None]
    assert masks and any(not bool(m.all()) for m in masks)
    assert any(m is not None and not bool(m.all()) for m in evaluated)  # validation: the same
    for m in masks:  # right padding: each row is real tokens, then padding
        lengths = m.sum(1)
        assert torch.equal(m, torch.arange(m.shape[1])[None, :] < lengths[:, None])
    seen.clear()
    train(make_cfg(steps=1, output_dir=str(tmp_path / "cpt")))  # packed full blocks: nothing to mask
    assert seen and all(m is None for m in seen)


def test_logit_post_processing_families_train_on_their_real_logits(make_cfg, tokenizer):
    """Granite divides its logits by logits_scaling after the head: the fused head + loss (which
    computes lm_head(hidden) alone) must not run for it, so both settings train the same objective."""
    from transformers import GraniteConfig, GraniteForCausalLM

    losses = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128, logits_scaling=8.0))
        res = train(make_cfg(steps=1, fused_cross_entropy=fused, output_dir=str(make_cfg()["output_dir"]) + f"-{fused}"),
                    model=model, tokenizer=tokenizer)
        losses.append(res.final_loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_transformers_moe_model_is_not_trained_without_its_aux_loss(make_cfg, tokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128))
    with pytest.raises(MoeforgeError, match="Qwen3MoeForCausalLM is a transformers MoE model; .*'qwen3_moe' is not imported"):
        train(make_cfg(steps=1), model=model, tokenizer=tokenizer)


def test_the_final_evaluation_is_recorded_even_when_a_mixture_update_evaluated_that_step(make_cfg):
    mixture = {"type": "dynamic", "update_every": 2, "eval_tokens": 64}
    first = train(make_cfg(steps=4, mixture=mixture, eval_tokens=512))
    evals = [r for r in read_metrics(first.output_dir) if r["kind"] == "eval" and r["step"] == 4]
    assert [bool(r.get("final")) for r in evals] == [False, True]  # the mixture's 64-token look, then the final one
    assert evals[1]["eval"] == pytest.approx(first.eval_losses) and evals[0]["eval"] != evals[1]["eval"]
    again = train(make_cfg(steps=4, mixture=mixture, eval_tokens=512))
    assert again.eval_losses == pytest.approx(first.eval_losses)


def test_no_eval_records_without_validation_data(make_cfg):
    data = [{"name": "prose", "builtin": "prose", "weight": 1.0, "max_tokens": 3000, "valid_fraction": 0}]
    res = train(make_cfg(steps=4, eval_every=2, data=data))
    assert not [r for r in read_metrics(res.output_dir) if r["kind"] == "eval"]


def test_eval_tasks_are_measured_during_training_without_changing_it(make_cfg, tmp_path):
    """Task accuracy at each evaluation and at the end (kind: tasks in metrics.jsonl), equal to
    `moeforge eval --task` on the saved model, and the run trains exactly as it does without them."""
    from moeforge.eval.tasks import evaluate_task, resolve_task

    tasks = {"tasks": ["arithmetic-choice", "arithmetic"], "limit": 3, "max_new_tokens": 3, "shots": 1}
    res = train(make_cfg(steps=4, eval_every=2, eval_tasks=tasks))
    recs = [r for r in read_metrics(res.output_dir) if r["kind"] == "tasks"]
    assert [(r["step"], bool(r.get("final"))) for r in recs] == [(2, False), (4, True)]
    assert all(set(r["tasks"]) == {"arithmetic-choice", "arithmetic"} for r in recs)
    assert all(r["tasks"][t]["total"] == 3 for r in recs for t in r["tasks"])
    model, tok = moeforge.load_with_tokenizer(str(res.final_dir))
    again = evaluate_task(model, tok, resolve_task("arithmetic-choice", limit=3), shots=1)
    assert recs[-1]["tasks"]["arithmetic-choice"]["accuracy"] == again.accuracy
    plain = train(make_cfg(steps=4, eval_every=2, output_dir=str(tmp_path / "plain")))
    losses = [r["loss"] for r in read_metrics(res.output_dir) if r["kind"] == "train"]
    assert losses == [r["loss"] for r in read_metrics(plain.output_dir) if r["kind"] == "train"]
    rerun = train(make_cfg(steps=4, eval_every=2, eval_tasks=tasks))  # a finished run rerun: nothing remeasured
    assert rerun.steps == 4 and len([r for r in read_metrics(res.output_dir) if r["kind"] == "tasks"]) == 2


@pytest.mark.parametrize("eval_tasks, message", [
    ({"tasks": ["arithmetc"]}, "Did you mean 'arithmetic'"),
    ({"tasks": ["arithmetic"], "limit": 0}, "eval_tasks.limit must be a positive integer"),
    ({"tasks": ["arithmetic"], "chat": "maybe"}, "eval_tasks.chat must be one of"),
    ({"tasks": ["arithmetic", "arithmetic"]}, "names a task twice"),
])
def test_bad_eval_tasks_fail_before_training(make_cfg, tmp_path, eval_tasks, message):
    with pytest.raises(MoeforgeError, match=message):
        train(make_cfg(eval_tasks=eval_tasks))
    assert not (tmp_path / "out").exists()


def test_two_eval_task_files_with_one_name_are_refused(make_cfg, tmp_path):
    """Results are keyed by task name: a/quiz/test.jsonl and b/quiz/test.jsonl would overwrite each other."""
    for folder in ("a", "b"):
        (tmp_path / folder / "quiz").mkdir(parents=True)
        (tmp_path / folder / "quiz" / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    tasks = [str(tmp_path / "a" / "quiz" / "test.jsonl"), str(tmp_path / "b" / "quiz" / "test.jsonl")]
    with pytest.raises(MoeforgeError, match="task 'quiz/test' given twice"):
        train(make_cfg(eval_tasks={"tasks": tasks}))
    assert not (tmp_path / "out").exists()
