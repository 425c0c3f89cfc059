"""evaluate(): corpora checked before any forward pass, honest cost at the window that ran, caveats."""

import pytest

from moeforge.errors import MoeforgeError
from moeforge.eval.corpora import EvalCorpus, resolve_corpus
from moeforge.eval.cost import flops_per_token, parameter_counts
from moeforge.eval.evaluate import evaluate, unique_names

from .tiny import tiny_llama, tiny_moe, tiny_tokenizer


def test_a_bad_corpus_is_refused_before_any_corpus_is_scored():
    seen = []
    bad = EvalCorpus("tiny", ("a",), "inline")
    with pytest.raises(MoeforgeError, match="'tiny' .* fewer than two tokens"):
        evaluate(tiny_moe(), tiny_tokenizer(), ["prose", bad], max_tokens=64, seq_len=32, progress=seen.append)
    assert seen == []  # prose (first) was not evaluated either


def test_same_stem_files_get_folder_names_and_a_repeated_corpus_is_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.txt").write_text("some text to score " * 30)
    report = evaluate(tiny_llama(), tiny_tokenizer(), [str(tmp_path / "a" / "mine.txt"), str(tmp_path / "b" / "mine.txt")],
                      max_tokens=64, seq_len=32)
    assert set(report.perplexity) == {"a/mine", "b/mine"}
    (tmp_path / "a" / "mine.md").write_text("other text to score " * 30)  # same folder, same stem
    names = [c.name for c in unique_names([resolve_corpus(str(tmp_path / "a" / n)) for n in ("mine.txt", "mine.md")])]
    assert names == ["a/mine.txt", "a/mine.md"]
    with pytest.raises(MoeforgeError, match="given twice"):
        unique_names([resolve_corpus(str(tmp_path / "a" / "mine.txt"))] * 2)
    with pytest.raises(MoeforgeError, match="corpus prose given twice"):
        unique_names([EvalCorpus("prose", ("x y",), "builtin"), EvalCorpus("prose", ("x y",), "builtin")])


def test_flops_are_those_of_the_window_that_ran_and_windows_past_the_context_are_refused():
    model = tiny_moe()  # max_position_embeddings 256
    report = evaluate(model, tiny_tokenizer(), ["arithmetic"], max_tokens=48, seq_len=512)
    assert report.seq_len == 48 and report.flops_per_token == flops_per_token(model, seq_len=48)
    with pytest.raises(MoeforgeError, match=r"--seq-len\) 300 gives windows of 300 tokens, more than the model's context "
                                            r"of 256 positions .*--seq-len 256"):
        evaluate(model, tiny_tokenizer(), ["prose"], max_tokens=600, seq_len=300)
    with pytest.raises(MoeforgeError, match=r"--seq-len\) 100000 gives windows of 600 tokens \(all the tokens of the longest"):
        evaluate(model, tiny_tokenizer(), ["prose"], max_tokens=600, seq_len=100_000)


def test_a_transformers_moe_model_is_not_scored_as_dense():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(MoeforgeError, match="MixtralForCausalLM is a transformers MoE model.*moeforge.load"):
        evaluate(MixtralForCausalLM(cfg).eval(), tiny_tokenizer(), ["prose"], max_tokens=64, seq_len=32)


def test_experts_per_token_and_the_expert_choice_caveat():
    topk = evaluate(tiny_moe(), tiny_tokenizer(), ["prose"], max_tokens=128, seq_len=32)
    assert topk.routing.summary()["experts_per_token"] == pytest.approx(2.0) and topk.notes == []
    ec = tiny_moe(router="expert_choice", expert_choice_causal=True)
    reports = {b: evaluate(ec, tiny_tokenizer(), ["prose"], max_tokens=128, seq_len=32, batch_size=b) for b in (1, 4)}
    assert "depend on the batch size (here 4" in reports[4].notes[0]
    # the caveat is real: one window per batch gives every token to every expert
    assert reports[1].routing.summary()["experts_per_token"] == pytest.approx(4.0)
    assert reports[4].routing.summary()["experts_per_token"] < 4.0
    leak = tiny_moe(router="expert_choice", allow_future_tokens=True)
    assert "not that of a left-to-right language model" in evaluate(leak, tiny_tokenizer(), ["prose"], max_tokens=64,
                                                                     seq_len=32).notes[0]


def test_noisy_topk_noise_weights_are_not_active_parameters():
    noisy, plain = tiny_moe(router="noisy_topk"), tiny_moe(router="topk")
    counts, base = parameter_counts(noisy), parameter_counts(plain)
    noise = sum(m.router.noise.numel() for m in noisy.modules() if hasattr(m, "router") and hasattr(m.router, "noise"))
    assert noise > 0
    assert counts["total"] == base["total"] + noise and counts["active"] == base["active"]


def test_a_directory_is_not_a_missing_corpus(tmp_path):
    from moeforge.eval.corpora import resolve_corpus

    with pytest.raises(MoeforgeError, match="is a directory"):
        resolve_corpus(str(tmp_path))


def test_adapters_and_compositions_on_a_moe_model_keep_its_routing():
    from moeforge.compose import compose
    from moeforge.peft import LoRAConfig, wrap

    plain = evaluate(tiny_moe(), tiny_tokenizer(), ["prose"], max_tokens=128, seq_len=32)
    adapted = wrap(tiny_moe(), LoRAConfig(target_modules=["q_proj"]))  # B = 0: same logits as the base
    composed = compose(tiny_moe(), tiny_llama(), num_connections=1)  # zero output projection: the anchor's logits
    for model in (adapted, composed):
        report = evaluate(model, tiny_tokenizer(), ["prose"], max_tokens=128, seq_len=32)
        assert report.is_moe and report.routing.moe_layers == [0, 2]
        assert report.perplexity["prose"] == pytest.approx(plain.perplexity["prose"], rel=1e-5)
        assert [s.load for s in report.routing.layers()] == [s.load for s in plain.routing.layers()]


def test_composition_flops_run_the_augmenting_decoder_without_embedding_or_head():
    from moeforge.compose import compose

    anchor, aug = tiny_moe(), tiny_llama()  # tiny_llama: untied 300 x 32 embedding and LM head
    composed = compose(anchor, aug, num_connections=1)
    seq = 64
    # augmenting decoder: 2 layers of attention (32*32 + 2*16*32 + 32*32) and MLP (3*32*64), norms (3*32)
    aug_matmul = 2 * (3072 + 6144 + 64) + 32
    assert aug_matmul == parameter_counts(aug)["total"] - 2 * 300 * 32
    aug_attention = 2 * 2 * 2 * (4 * 8) * (seq + 1) / 2  # 2 layers, 4 heads of 8
    # one connection: two norms of 32, the 32 -> 32 projection and q, k, v, o of 32 x 32; 4 heads of 8, causal
    conn = 2 * 32 + 5 * 32 * 32
    conn_attention = 2 * 2 * (4 * 8) * (seq + 1) / 2
    anchor_flops = 2 * parameter_counts(anchor)["active"] + 2 * 2 * 3 * (4 * 8) * (seq + 1) / 2  # tied head, 3 layers
    expected = anchor_flops + 2 * aug_matmul + aug_attention + 2 * conn + conn_attention
    assert flops_per_token(composed, seq) == int(expected)
