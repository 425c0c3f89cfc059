"""`moeforge eval` on a composition: FLOPs of what one forward runs, the MoE anchor's routing."""

import torch

from moeforge.compose import compose
from moeforge.compose.kv_task import char_tokenizer
from moeforge.eval.cost import flops_per_token
from moeforge.eval.evaluate import evaluate

from .conftest import llama, moe, randomize_outputs


def _matmul_flops_per_token(module, tokens=5) -> int:
    """2 x the multiply-accumulates per token of every nn.Linear that runs, counted by forward hooks."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        total += 2 * mod.weight.numel() * args[0].shape[:-1].numel() // tokens

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            module(torch.randint(3, 40, (1, tokens)))
    finally:
        for h in handles:
            h.remove()
    return total


def test_flops_count_the_augmenting_decoder_not_its_embedding_and_head():
    """Was 2.1x too high here: m_A's embedding and (unused) LM head counted as matmuls, its attention
    and the cross-attention left out."""
    anchor, augmenting = llama(vocab=8000), llama(vocab=8000, seed=3)
    composed = compose(anchor, augmenting, num_connections=2)
    seq = 64

    def attn(m):
        return 2 * 2 * m.config.num_hidden_layers * m.config.hidden_size * (seq + 1) / 2

    cross = 2 * 2 * 2 * anchor.config.hidden_size * (seq + 1) / 2
    # linear layers actually run (the anchor's LM head included, m_A's not) + attention products
    expected = _matmul_flops_per_token(composed) + attn(anchor) + attn(augmenting) + cross
    got = flops_per_token(composed, seq)
    assert abs(got - expected) / expected < 0.01  # norms' elementwise products are the rest
    assert got < 0.6 * (flops_per_token(anchor, seq) + flops_per_token(augmenting, seq) + 2 * 8000 * 64 * 2)


def test_a_composition_with_a_moe_anchor_reports_its_routing():
    """eval said "dense model: no routing statistics" for a composition whose anchor is a MoE model."""
    composed = randomize_outputs(compose(moe(hidden=48, layers=3), llama(), num_connections=2)).eval()
    report = evaluate(composed, char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32)
    assert report.is_moe and len(report.routing.layers()) == 3


def test_windows_past_the_augmenting_models_context_refused():
    import pytest

    from moeforge.errors import MoeforgeError

    augmenting = moe()
    augmenting.config.max_position_embeddings = 16
    composed = compose(llama(), augmenting, num_connections=2)  # the anchor's context is 64
    with pytest.raises(MoeforgeError, match="more than the model's context of 16 positions"):
        evaluate(composed, char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32)


def test_task_accuracy_runs_on_a_composition_and_batches_like_single_prompts():
    """`moeforge eval --task` on a composition: its own generate() (no transformers stop strings),
    batched with left padding, gives each prompt the replies it gets alone."""
    from moeforge.eval.tasks import evaluate_task, generate_replies, resolve_task

    tok = char_tokenizer()
    composed = randomize_outputs(compose(llama(), moe(), num_connections=2)).eval()
    prompts = [tok(t).input_ids for t in ("12 + 3 =", "7 * 8 =", "100 - 99 =")]
    batched = generate_replies(composed, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate_replies(composed, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone
    result = evaluate_task(composed, tok, resolve_task("arithmetic", limit=4), shots=1, chat="off", max_new_tokens=4)
    assert result.total == 4 and all(isinstance(s["reply"], str) for s in result.samples)


def test_task_prompts_past_the_augmenting_models_context_refused():
    """A composition runs both models on every token: generation prompts longer than the augmenting
    model's context are refused as perplexity windows are (they ran, silently, past its positions)."""
    import pytest

    from moeforge.errors import MoeforgeError
    from moeforge.eval.tasks import evaluate_task, resolve_task

    augmenting = moe()
    augmenting.config.max_position_embeddings = 16
    composed = compose(llama(), augmenting, num_connections=2)  # the anchor's context is 64
    with pytest.raises(MoeforgeError, match="more than the model's context of 16"):
        evaluate_task(composed, char_tokenizer(), resolve_task("arithmetic", limit=2), shots=2, chat="off",
                      max_new_tokens=8)


def test_a_composition_with_a_moe_augmenting_model_does_not_call_itself_dense():
    """eval printed "dense model: no routing statistics" and "the model has no MoE layers" for a dense anchor
    composed with a MoE augmenting model, whose routing it does not record."""
    composed = compose(llama(), moe(hidden=48, layers=3), num_connections=2).eval()
    report = evaluate(composed, char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32)
    assert not report.is_moe and report.parameters["active"] < report.parameters["total"]
    assert any("augmenting model has 3 MoE layers" in note for note in report.notes)
    plain = evaluate(llama(), char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32)
    assert plain.notes == []


def test_the_cli_report_names_unrecorded_moe_layers(capsys):
    from moeforge.cli.eval import print_report

    composed = compose(llama(), moe(hidden=48, layers=3), num_connections=2).eval()
    print_report(evaluate(composed, char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32))
    out = capsys.readouterr().out
    assert "dense model" not in out and "note: the augmenting model has 3 MoE layers" in out
    print_report(evaluate(llama(), char_tokenizer(), ["arithmetic"], max_tokens=64, seq_len=32))
    assert "no routing statistics: dense model" in capsys.readouterr().out
