"""Sheared-LLaMA dynamic batch loading on a hand-worked example, and the LR schedule."""

import math

import pytest

from moeforge.errors import MoeforgeError
from moeforge.train.config import MixtureConfig
from moeforge.train.mixture import Mixture, dynamic_update
from moeforge.train.schedule import lr_at


def test_dynamic_update_hand_worked():
    # w = (.5, .3, .2), l = (2, 3, 1), l_ref = (1.5, 2, 1.5), eta = 1, c = 0.1
    # excess l - l_ref = (.5, 1, -.5)
    # w * exp(excess) = (.5 e^.5, .3 e^1, .2 e^-.5) = (0.8243606, 0.8154845, 0.1213061), sum 1.7611513
    # softmax(log w + excess) = (0.4680806, 0.4630407, 0.0688787)
    # w' = 0.9 * softmax + 0.1 / 3 = (0.4546058, 0.4500699, 0.0953243)
    new = dynamic_update([0.5, 0.3, 0.2], [2.0, 3.0, 1.0], [1.5, 2.0, 1.5], eta=1.0, c=0.1)
    assert new == pytest.approx([0.4546058, 0.4500699, 0.0953243], abs=1e-7)
    assert sum(new) == pytest.approx(1.0, abs=1e-12)
    # the paper's clipped excess max(l - l_ref, 0) = (.5, 1, 0): third term .2 e^0 = .2, sum 1.8398452
    # w' = 0.9 * (0.8243606, 0.8154845, 0.2) / 1.8398452 + 0.0333333 = (0.4365871, 0.4322452, 0.1311677)
    clipped = dynamic_update([0.5, 0.3, 0.2], [2.0, 3.0, 1.0], [1.5, 2.0, 1.5], eta=1.0, c=0.1, clip_excess=True)
    assert clipped == pytest.approx([0.4365871, 0.4322452, 0.1311677], abs=1e-7)


def test_dynamic_update_degenerate_cases():
    w = [0.25, 0.25, 0.5]
    # losses at the reference: only the smoothing toward uniform acts
    same = dynamic_update(w, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], eta=1.0, c=1e-4)
    assert same == pytest.approx([(1 - 1e-4) * x + 1e-4 / 3 for x in w], abs=1e-12)
    # eta = 0 ignores the losses
    assert dynamic_update(w, [9.0, 0.0, 0.0], [0.0, 0.0, 0.0], eta=0.0, c=0.0) == pytest.approx(w)
    # c = 1 would be uniform; c = 0 with a huge excess concentrates all weight
    big = dynamic_update(w, [50.0, 0.0, 0.0], [0.0, 0.0, 0.0], eta=1.0, c=0.0)
    assert big[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(MoeforgeError, match="non-finite"):
        dynamic_update(w, [float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0])


def test_mixture_update_and_state():
    m = Mixture(["a", "b"], [3.0, 1.0], MixtureConfig(type="dynamic", update_every=5, c=0.0))
    assert m.weights == pytest.approx([0.75, 0.25])
    assert not m.due(4) and m.due(5) and m.due(10)
    m.set_reference({"a": 1.0, "b": 1.0})
    m.update({"a": 1.0, "b": 1.0 + math.log(3.0)})  # b's excess ln 3 triples its odds: equal weights
    assert m.weights == pytest.approx([0.5, 0.5])
    state = m.state_dict()
    n = Mixture(["a", "b"], [1.0, 1.0], MixtureConfig(type="dynamic"))
    n.load_state_dict(state)
    assert n.weights == m.weights and n.reference == m.reference
    with pytest.raises(MoeforgeError, match="differ"):
        Mixture(["a", "c"], [1.0, 1.0], MixtureConfig()).load_state_dict(state)
    with pytest.raises(MoeforgeError, match="sum to > 0"):
        Mixture(["a", "b"], [0.0, 0.0], MixtureConfig())


def test_schedule_warmup_cosine_floor():
    kw = dict(lr=1.0, total_steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.5)
    assert lr_at(1, **kw) == pytest.approx(1.0)
    assert lr_at(2, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(10, **kw) == pytest.approx(0.1)  # last step at the floor
    mid = lr_at(6, **kw)  # halfway through the 8 decay steps: (1 + 0.1) / 2
    assert mid == pytest.approx(0.55)
    values = [lr_at(s, **kw) for s in range(2, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, lr=1.0, total_steps=1, warmup_steps=0, min_lr_ratio=0.0) == pytest.approx(1.0)
