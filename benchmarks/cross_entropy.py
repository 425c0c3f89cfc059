"""moeforge's fused LM head + cross-entropy vs the plain computation, loss and both gradients.

Plain: ``F.cross_entropy(hidden @ W.T, targets)`` then backward, which keeps (tokens, vocab)
float32 logits, their softmax and its gradient. Fused (:mod:`moeforge.train.fused_ce`, what the
trainer runs): the head and the loss in row chunks, gradients computed in the same pass. Shapes
are one SmolLM2 training step of the train-step benchmark: 4,096 tokens (batch 8 x 512), hidden
576, vocabulary 49,152.

    .venv/bin/python benchmarks/cross_entropy.py [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moeforge.train.fused_ce import linear_cross_entropy
from _args import positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=positive_int, default=4096)
    ap.add_argument("--hidden", type=positive_int, default=576)
    ap.add_argument("--vocab", type=positive_int, default=49152)
    ap.add_argument("--repeats", type=positive_int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)

    def plain():
        loss = F.cross_entropy(hidden @ weight.t(), targets)
        loss.backward()
        return loss

    def fused():
        loss, _ = linear_cross_entropy(hidden, weight, targets, scale=1.0 / args.tokens)
        loss.backward()
        return loss

    results = {}
    for name, fn in (("plain", plain), ("fused", fused)):
        hidden.grad = weight.grad = None
        results[name] = {"loss": float(fn().detach()), "grad_w": weight.grad.clone(), "times": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, fn in (("plain", plain), ("fused", fused)):
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            fn()
            results[name]["times"].append(time.perf_counter() - t0)
    diff = float((results["plain"]["grad_w"] - results["fused"]["grad_w"]).abs().max())
    from moeforge.eval.report import device_description

    print(f"{device_description()}; {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, "
          f"torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"loss plain {results['plain']['loss']:.6f} fused {results['fused']['loss']:.6f}; max |grad W diff| {diff:.2e}")
    for name in ("plain", "fused"):
        print(f"  {name:<6} {statistics.median(results[name]['times']):.3f} s")
    ratio = statistics.median(results["plain"]["times"]) / statistics.median(results["fused"]["times"])
    print(f"  fused is {ratio:.2f}x faster" if ratio >= 1 else f"  fused is {1 / ratio:.2f}x slower")


if __name__ == "__main__":
    main()
