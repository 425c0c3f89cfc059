"""MoE layer speed: moeforge vs transformers' MixtralSparseMoeBlock vs the dense limit, in one run.

For each (experts, top-k, expert size) shape, over T tokens at hidden size H, it times forward
and forward+backward of:

* ``moeforge``: :class:`moeforge.moe.MoELayer` (top-k router, dropless sorted execution);
* ``hf-<impl>``: transformers' ``MixtralSparseMoeBlock`` under every experts implementation it
  offers on every device (``eager``, ``batched_mm``, ``grouped_mm``; the CUDA-only Hub kernels
  ``deepgemm`` and ``sonicmoe`` are not run);
* ``limit``: a dense SwiGLU MLP of width top-k x expert size, i.e. the same matmul FLOPs with
  no routing at all.

Contenders are timed in rotation (one call each, repeated) and the median is reported, so drift
in machine load affects all of them alike. The table gives milliseconds and the ratio to the
limit. Usage::

    python benchmarks/moe_layer.py [--shapes '8,2,192;16,4,96;64,8,24'] [--tokens 4096] [--hidden 576]
                                   [--repeats 15] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moeforge.moe import MoEConfig, MoELayer
from _args import positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)

SHAPES = [(8, 2, 192), (16, 4, 96), (64, 8, 24)]
HF_IMPLS = ["eager", "batched_mm", "grouped_mm"]


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def batched_mm_bytes(tokens: int, e: int, k: int, size: int, hidden: int, dtype: torch.dtype) -> int:
    """transformers' batched_mm gathers a (2I, H) weight copy for every (token, expert) pair."""
    return tokens * k * 3 * size * hidden * torch.empty((), dtype=dtype).element_size()


def contenders(e: int, k: int, size: int, hidden: int, dtype: torch.dtype, device: str, skip: set[str]):
    torch.manual_seed(0)
    ours = MoELayer(MoEConfig(hidden_size=hidden, expert_size=size, num_experts=e, top_k=k, aux_loss_coef=0.0))
    ours.to(device, dtype)
    out = {"moeforge": lambda x, m=ours: m(x).hidden_states}
    out["moeforge"].module = ours  # its weights, whose gradients measure() clears
    for impl in HF_IMPLS:
        if impl in skip:
            continue
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=size, num_local_experts=e, num_experts_per_tok=k)
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg).to(device, dtype)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        out[f"hf-{impl}"] = block
    out["limit"] = DenseSwiGLU(hidden, k * size).to(device, dtype)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict, x: torch.Tensor, backward: bool, repeats: int, device: str) -> dict[str, float]:
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    params = {fn: list(getattr(fn, "module", fn).parameters()) for fn in fns.values()}

    def once(fn):
        inp = x.detach().requires_grad_(backward)
        # every call starts without weight gradients, as a training step after zero_grad(set_to_none=True):
        # otherwise each backward adds into the previous call's gradients, an extra pass over every weight
        # that the MoE contenders pay on E/k times more weights than the limit
        for p in params[fn]:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        y = fn(inp)
        if backward:
            y.backward(grad)
        sync(device)
        return time.perf_counter() - t0

    for name, fn in fns.items():  # warm-up
        for _ in range(2):
            once(fn)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def check_same_output(fns: dict, x: torch.Tensor) -> None:
    """Every transformers contender computes moeforge's output. Errors are measured against the
    output's scale (its largest entry): an absolute tolerance would pass almost any output at
    shapes whose outputs are themselves about that small (64 x 8 x 24: entries ~3e-3). In float32
    the outputs must agree to 1e-5 of that scale. In a low precision, transformers' router runs in
    that precision and moeforge's in float32, so a near-tie may send a token to a different expert:
    up to 5% of tokens may then differ (top-8 of 64 experts has many near-ties), the rest must agree
    to 2e-2 of the scale."""
    tol, allowed = (1e-5, 0.0) if x.dtype == torch.float32 else (2e-2, 0.05)
    with torch.no_grad():
        ref = fns["moeforge"](x).reshape(-1, x.shape[-1]).float()
        atol = tol * ref.abs().max().item()
        for name, fn in fns.items():
            if not name.startswith("hf-"):
                continue
            out = fn(x.clone()).reshape(-1, x.shape[-1]).float()
            bad = ~torch.isclose(out, ref, atol=atol, rtol=tol).all(dim=1)
            frac = bad.float().mean().item()
            if frac > allowed:
                raise SystemExit(f"{name} disagrees with moeforge on {frac:.2%} of tokens (allowed {allowed:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                    help="experts,top-k,expert-size triples separated by ';' (default: the issue's three)")
    ap.add_argument("--tokens", type=positive_int, default=4096)
    ap.add_argument("--hidden", type=positive_int, default=576)
    ap.add_argument("--repeats", type=positive_int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-gib", type=float, default=4.0,
                    help="skip a contender whose per-call weight gathers exceed this many GiB (batched_mm)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from moeforge.eval.report import device_description

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else device_description()
    print(f"device={args.device} ({where}) threads={torch.get_num_threads()} torch={torch.__version__} "
          f"tokens={args.tokens} hidden={args.hidden} dtype={args.dtype} repeats={args.repeats} (median ms)")
    header = f"{'shape (E,k,I)':>14} {'pass':>9} " + " ".join(f"{n:>13}" for n in ["moeforge", *[f'hf-{i}' for i in HF_IMPLS], "limit"])
    print(header)
    summary = []
    try:
        shapes = [tuple(int(v) for v in item.split(",")) for item in args.shapes.split(";") if item.strip()]
        if not shapes or any(len(t) != 3 or min(t) < 1 or t[1] > t[0] for t in shapes):
            raise ValueError
    except ValueError:
        ap.error(f"--shapes {args.shapes!r}: give experts,top-k,expert-size triples with 1 <= top-k <= experts, "
                 "separated by ';', e.g. '8,2,192;64,8,24'")
    for e, k, size in shapes:
        skip = set()
        need = batched_mm_bytes(args.tokens, e, k, size, args.hidden, dtype) / 2**30
        if need > args.max_gib:
            skip.add("batched_mm")
            print(f"{str((e, k, size)):>14} hf-batched_mm skipped: it would gather {need:.1f} GiB of expert weights "
                  f"per call (limit --max-gib {args.max_gib})")
        fns = contenders(e, k, size, args.hidden, dtype, args.device, skip)
        x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype)
        check_same_output(fns, x)
        for backward in (False, True):
            ms = measure(fns, x, backward, args.repeats, args.device)
            limit = ms["limit"]
            cells = " ".join(
                f"{ms[n]:7.1f} {ms[n] / limit:4.2f}x" if n in ms else f"{'skipped':>13}"
                for n in ["moeforge", *[f"hf-{i}" for i in HF_IMPLS], "limit"]
            )
            label = "fwd+bwd" if backward else "fwd"
            print(f"{str((e, k, size)):>14} {label:>9} {cells}")
            best_hf = min((ms[n], n) for n in fns if n.startswith("hf-"))
            summary.append(((e, k, size), label, ms["moeforge"] / limit, ms["moeforge"] / best_hf[0], best_hf[1]))
    print("\nsummary: moeforge / limit, and moeforge / best transformers implementation")
    for shape, label, vs_limit, vs_hf, hf_name in summary:
        print(f"  {str(shape):>14} {label:>8}: {vs_limit:4.2f}x limit, {vs_hf:4.2f}x {hf_name}")


if __name__ == "__main__":
    main()
