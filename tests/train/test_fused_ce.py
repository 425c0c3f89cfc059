"""The fused LM head + cross-entropy equals the plain computation, and the trainer uses it."""

import pytest
import torch
import torch.nn.functional as F

from moeforge.train.fused_ce import linear_cross_entropy


def test_loss_and_gradients_equal_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 10, 36]] = -100
    loss, per_token = linear_cross_entropy(hidden, weight, targets, scale=0.25, chunk=8)
    (loss * 3.0).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref_tok = F.cross_entropy(h2 @ w2.t(), targets, ignore_index=-100, reduction="none")
    ref = ref_tok.sum() * 0.25
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(per_token, ref_tok.detach())
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    assert not per_token.requires_grad


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    loss, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (5,)))
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_trainer_fused_and_plain_loss_paths_agree(tmp_path, make_cfg, monkeypatch):
    from moeforge.train import train
    from moeforge.train import trainer as trainer_mod

    calls = []
    real = trainer_mod.linear_cross_entropy
    monkeypatch.setattr(trainer_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = train(make_cfg(steps=3, output_dir=str(tmp_path / "f")))
    assert len(calls) == 6  # 3 steps x 2 micro-batches went through the fused head
    plain = train(make_cfg(steps=3, fused_cross_entropy=False, output_dir=str(tmp_path / "p")))
    assert len(calls) == 6
    a = [r["loss"] for r in fused.history if r["kind"] == "train"]
    b = [r["loss"] for r in plain.history if r["kind"] == "train"]
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-5)
    # Adam turns float32 summation-order noise in a near-zero gradient into a full-size update of
    # either sign, so parameters may differ by a small fraction of one step (lr 3e-3); a wrong
    # gradient term would move them by whole steps (~1e-2 after 3 steps)
    for (n, p), q in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=n)
