"""Perplexity against transformers' own loss and against degenerate models with known answers."""

import math

import pytest
import torch
from torch import nn

from moeforge.analysis.stats import RoutingStats
from moeforge.eval.perplexity import evaluate_nll, perplexity, windows

from .tiny import tiny_llama, tiny_moe


def test_equals_transformers_loss_over_windows():
    model = tiny_llama()
    ids = torch.randint(0, 300, (3 * 64 + 17,))  # 3 full windows, a partial one that is dropped
    chunks = ids[: 3 * 64].view(3, 64)
    with torch.no_grad():
        # transformers' mean next-token cross-entropy, window by window (all windows equal length)
        losses = [model(c[None], labels=c[None]).loss.item() for c in chunks]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, ids, seq_len=64, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_direct_log_softmax_sum_and_counts():
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 300, (100,))
    res = evaluate_nll(model, ids, seq_len=32, batch_size=3)
    chunks = ids[:96].view(3, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(chunks).logits.double(), -1)
    nll = -sum(logp[w, t, chunks[w, t + 1]].item() for w in range(3) for t in range(31))
    assert res.predictions == 3 * 31
    assert res.tokens == 96
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nll / 93), rel=1e-5)


class Uniform(nn.Module):
    """Predicts the uniform distribution over V tokens: perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kw):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_has_vocab_perplexity():
    ids = torch.randint(0, 37, (50,))
    assert perplexity(Uniform(37), ids, seq_len=8) == pytest.approx(37.0, rel=1e-6)


def test_short_stream_is_one_window_and_max_tokens_cuts():
    assert windows(torch.arange(10), 64).shape == (1, 10)
    assert windows(torch.arange(300), 64, max_tokens=200).shape == (3, 64)
    with pytest.raises(ValueError):
        windows(torch.arange(1), 64)


def test_batch_size_does_not_change_the_result():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 300, (5 * 16,))
    a = perplexity(model, ids, seq_len=16, batch_size=1)
    b = perplexity(model, ids, seq_len=16, batch_size=5)
    assert a == pytest.approx(b, rel=1e-5)


def test_moe_routing_is_gathered_in_the_same_pass():
    model = tiny_moe()
    ids = torch.randint(0, 300, (4 * 24,))
    stats = RoutingStats()
    seen = []
    res = evaluate_nll(model, ids, seq_len=24, batch_size=3, on_routing=lambda r, b: (stats.update(r), seen.append(b.shape)))
    assert seen == [(3, 24), (1, 24)]
    assert stats.moe_layers == [0, 2]
    for s in stats.layers():
        assert s.tokens == res.tokens == 96
        assert s.pairs == 2 * 96  # top-2, no dropping
    assert model.training is False


class Confident(Uniform):
    """Puts a logit of +1000 on token 0 and 0 elsewhere: every other next token costs ~1000 nats."""

    def forward(self, input_ids, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 0] = 1000.0
        return type("Out", (), {"logits": logits})()


def test_a_mean_nll_past_float_range_is_infinite_perplexity_not_an_error():
    res = evaluate_nll(Confident(5), torch.ones(20, dtype=torch.long), seq_len=10)
    assert res.mean_nll == pytest.approx(1000.0)  # exp(1000) overflows a float
    assert res.perplexity == math.inf
