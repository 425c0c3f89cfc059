"""Choose the blocks of each batch from a weighted mixture of domains, reproducibly and resumably.

Domains are assigned to the sequences of a batch by smooth weighted round-robin: every draw
adds each domain's weight to its credit, takes the domain with the largest credit and takes 1
from it. Over any window the number of sequences per domain tracks the weights to within one
sequence, with no randomness (Sheared-LLaMA also fills each batch in proportion to the weights).
Within a domain, blocks are visited in a seeded random permutation, reshuffled every epoch.

The whole state (credits, per-domain cursor and epoch) is a few numbers, saved in checkpoints:
a resumed run draws exactly the blocks the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class MixtureSampler:
    """Draw ``(domain, block)`` pairs for batches.

    Args:
        sizes: number of training blocks per domain.
        seed: seeds the per-domain, per-epoch permutations.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        self.sizes = [int(s) for s in sizes]
        self.seed = int(seed)
        self.credits = [0.0] * len(self.sizes)
        self.cursors = [0] * len(self.sizes)
        self.epochs = [0] * len(self.sizes)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    def _perm(self, domain: int) -> torch.Tensor:
        epoch = self.epochs[domain]
        cached = self._perms.get(domain)
        if cached is None or cached[0] != epoch:
            # modulo 2^64, the range torch's generator takes: the config's seeds go up to 2^63
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + domain * 7_919 + epoch * 104_729) % 2**64)
            cached = (epoch, torch.randperm(self.sizes[domain], generator=g))
            self._perms[domain] = cached
        return cached[1]

    def _next_block(self, domain: int) -> int:
        block = int(self._perm(domain)[self.cursors[domain]])
        self.cursors[domain] += 1
        if self.cursors[domain] >= self.sizes[domain]:
            self.cursors[domain] = 0
            self.epochs[domain] += 1
        return block

    def draw(self, weights: Sequence[float], n: int) -> list[tuple[int, int]]:
        """``n`` (domain index, block index) pairs following ``weights`` (summing to 1)."""
        if len(weights) != len(self.sizes):
            raise ValueError(f"{len(weights)} weights for {len(self.sizes)} domains")
        out = []
        for _ in range(n):
            for i, w in enumerate(weights):
                self.credits[i] += float(w) if self.sizes[i] > 0 else 0.0
            best = max(range(len(self.sizes)), key=lambda i: (self.credits[i], -i))
            self.credits[best] -= 1.0
            out.append((best, self._next_block(best)))
        return out

    def state_dict(self) -> dict:
        return {"credits": list(self.credits), "cursors": list(self.cursors), "epochs": list(self.epochs), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        from ..errors import MoeforgeError

        if list(state["sizes"]) != self.sizes:
            raise MoeforgeError(
                f"checkpoint's data has {state['sizes']} blocks per domain but the config now gives {self.sizes}; "
                "the data or seq_len changed since the checkpoint. Resume with the same data or use a new output_dir."
            )
        self.credits = [float(c) for c in state["credits"]]
        self.cursors = [int(c) for c in state["cursors"]]
        self.epochs = [int(e) for e in state["epochs"]]
