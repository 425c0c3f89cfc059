"""Training on a CUDA GPU: fused LM-head loss, the trainer with bf16 autocast (skipped without a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.train import read_metrics, train
from moeforge.train.fused_ce import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_cross_entropy_on_cuda_matches_materialised_logits():
    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda")
    t[::7] = -100
    loss, _ = linear_cross_entropy(h, w, t, scale=1 / 257, chunk=128)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t, ignore_index=-100, reduction="sum") / 257
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_runs_on_cuda_and_learns(make_cfg, tmp_path, precision):
    out = tmp_path / precision
    train(make_cfg(output_dir=str(out), steps=12, precision=precision, save_every=6, lr=3e-3, device="cuda"))
    recs = [r for r in read_metrics(out) if r["kind"] == "train"]
    losses = [r["loss"] for r in recs]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # the checkpoint holds the weights the GPU trained, loadable on the CPU
    from moeforge.train.checkpoint import list_checkpoints, load_checkpoint

    state = load_checkpoint(list_checkpoints(out)[-1][1], 0)["model"]
    assert all(v.device.type == "cpu" for v in state.values())
