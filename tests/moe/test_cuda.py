"""The MoE layer on a CUDA GPU against the same layer in float32 on the CPU (skipped without a GPU).

CI has no GPU; these run where one is (docs/benchmarks.md names the machine they last ran on).
"""

import pytest
import torch

from moeforge.moe import MoEConfig, MoELayer
from moeforge.moe.kernels import can_use_grouped_mm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROUTERS = [
    dict(router="topk"),
    dict(router="noisy_topk"),
    dict(router="switch", top_k=1, capacity_factor=1.0),
    dict(router="expert_choice", allow_future_tokens=True),
    dict(router="expert_choice", expert_choice_causal=True),
    dict(router="sigmoid_bias"),
    dict(router="topk", num_shared_experts=1, shared_expert_size=32),
]


def pair(**kw):
    cfg = dict(hidden_size=64, expert_size=32, num_experts=8, top_k=2)
    cfg.update(kw)
    torch.manual_seed(0)
    cpu = MoELayer(MoEConfig(**cfg))
    gpu = MoELayer(MoEConfig(**cfg))
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def run(layer, x, g):
    inp = x.clone().requires_grad_()
    out = layer(inp)
    (out.hidden_states.float() * g).sum().add(out.aux_loss).backward()
    grads = {n: p.grad.float().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return out.hidden_states.float().cpu(), inp.grad.float().cpu(), grads, out.routing.expert_index.cpu()


@pytest.mark.parametrize("kw", ROUTERS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("execution", ["auto", "fused"])
def test_float32_cuda_matches_cpu(kw, execution):
    cpu, gpu = pair(**kw)
    gpu.experts.execution = execution
    # eval: noisy_topk's noise comes from a different generator on each device
    cpu.eval(), gpu.eval()
    x = torch.randn(4, 24, 64)
    g = torch.randn(4, 24, 64)
    a = run(cpu, x, g)
    b = run(gpu, x.cuda(), g.cuda())
    assert torch.equal(a[3], b[3]), "the same experts must be chosen"
    torch.testing.assert_close(b[0], a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b[1], a[1], atol=1e-4, rtol=1e-4)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], atol=1e-4, rtol=1e-4, msg=name)


def test_bfloat16_grouped_gemm_path_tracks_float32():
    """bf16 on the GPU takes torch's grouped GEMM (SM >= 80); it stays within bf16 rounding of float32."""
    cpu, gpu = pair(num_experts=16, top_k=4, hidden_size=128, expert_size=64)
    gpu = gpu.to(torch.bfloat16).train()
    cpu.train()
    x = torch.randn(8, 64, 128)
    g = torch.randn(8, 64, 128)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert can_use_grouped_mm(x.cuda().bfloat16(), gpu.experts.gate_up_proj)
    a = run(cpu, x, g)
    b = run(gpu, x.cuda().bfloat16(), g.cuda())
    with torch.no_grad():  # the router computes in float32 in a bf16 model
        assert gpu(x.cuda().bfloat16()).routing.logits.dtype == torch.float32
    # a near-tie between two experts may flip when the router's input is rounded to bf16: compare
    # the tokens routed alike (each token's output and input gradient depend on its own routing only)
    same = (a[3].view(-1, 4) == b[3].view(-1, 4)).all(dim=1)
    assert same.float().mean() > 0.97, same.float().mean()
    for ref, low in zip(a[:2], b[:2]):
        ref, low = ref.reshape(-1, 128)[same], low.reshape(-1, 128)[same]
        err = ((ref - low).norm() / ref.norm()).item()
        assert err < 0.02, err
    for name in ("experts.down_proj", "router.weight"):
        ref, low = a[2][name], b[2][name]
        assert torch.nn.functional.cosine_similarity(ref.flatten(), low.flatten(), dim=0) > 0.99, name


def test_bf16_autocast_takes_the_grouped_gemm_and_trains_float32_weights(monkeypatch):
    """The trainer's GPU setting (bf16 autocast over float32 weights): autocast does not cover
    grouped_mm, so the layer casts its operands itself instead of falling back to a per-expert loop."""
    from moeforge.moe import kernels

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's grouped GEMM needs SM >= 80")
    calls = {"grouped": 0, "loop": 0}
    grouped, loop = kernels.F.grouped_mm, kernels._loop_linear

    def count_grouped(*a, **k):
        calls["grouped"] += 1
        return grouped(*a, **k)

    def count_loop(*a, **k):
        calls["loop"] += 1
        return loop(*a, **k)

    monkeypatch.setattr(kernels.F, "grouped_mm", count_grouped)
    monkeypatch.setattr(kernels, "_loop_linear", count_loop)
    _, gpu = pair(num_experts=16, top_k=2)
    gpu.train()
    x = torch.randn(4, 32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x)
    out.hidden_states.float().square().mean().backward()
    assert calls["grouped"] >= 2 and calls["loop"] == 0, calls
    assert gpu.experts.gate_up_proj.dtype == torch.float32 and gpu.experts.gate_up_proj.grad.dtype == torch.float32
    assert gpu.experts.down_proj.grad.abs().sum() > 0
