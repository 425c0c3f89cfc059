"""Training losses against references: transformers' causal LM loss, hand-computed KL, aux scaling."""

import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.train.losses import distillation_kl, token_cross_entropy, weighted_aux_loss

from .tiny import tiny_model


def test_cross_entropy_matches_model_loss(tokenizer):
    model = tiny_model(len(tokenizer))
    model.eval()
    ids = torch.randint(0, len(tokenizer), (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 7:] = -100
    out = model(input_ids=ids, labels=labels)
    ce, count = token_cross_entropy(out.logits, labels)
    assert count.tolist() == [7, 11, 6]  # targets are labels[:, 1:]
    torch.testing.assert_close(ce.sum() / count.sum(), out.lm_loss, rtol=1e-6, atol=1e-6)


def test_kl_hand_computed_and_zero_for_same_logits():
    # one target position, vocabulary of 2: p_teacher = softmax(0, ln 3) = (.25, .75), p_student = (.5, .5)
    # KL(t || s) = .25 ln(.25/.5) + .75 ln(.75/.5) = 0.1308128
    student = torch.zeros(1, 2, 2)
    teacher = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1]])
    kl = distillation_kl(student, teacher, labels)
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    # T^2 scaling: at temperature 2 the distributions soften; value = 4 * KL at T=2
    t2 = distillation_kl(student, teacher, labels, temperature=2.0)
    pt = F.softmax(teacher[0, 0] / 2, -1)
    ref = 4 * (pt * (pt.log() - math.log(0.5))).sum()
    assert t2.item() == pytest.approx(ref.item(), abs=1e-6)
    x = torch.randn(2, 5, 7)
    assert distillation_kl(x, x.clone(), torch.ones(2, 5, dtype=torch.long)).abs().max().item() < 1e-6


class _Out:
    def __init__(self, named, total=None):
        self.aux_losses = named
        self.aux_loss = total


def test_weighted_aux_loss_multipliers():
    out = _Out({"balance_loss": torch.tensor(0.2), "z_loss": torch.tensor(0.05)})
    total, named = weighted_aux_loss(out, 2.0, {"z_loss": 0.0})
    assert total.item() == pytest.approx(0.4)
    assert named["z_loss"].item() == 0.0
    assert weighted_aux_loss(_Out({}, None)) == (None, {})
    total, named = weighted_aux_loss(_Out({}, torch.tensor(0.3)), 0.5)
    assert total.item() == pytest.approx(0.15)
