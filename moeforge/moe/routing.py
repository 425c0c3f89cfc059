"""The routing decision a router hands to the experts, in one pair-list form for every router."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    """Which experts process which tokens, with what weight.

    Every router, token-choice or expert-choice, returns its decisions as a flat list of P
    (token, expert, weight) pairs. Token-choice routers without dropping emit exactly ``slots``
    pairs per token in token-major order, which lets the layer combine outputs with a reshape
    instead of a scatter.

    Attributes:
        token_index: (P,) long, the token of each pair (index into the flattened (T, H) input).
        expert_index: (P,) long, the expert of each pair.
        weight: (P,) float32 combine weight; carries gradient to the router.
        logits: (T, E) float32 router logits.
        probs: (T, E) float32 router scores (softmax, or sigmoid for ``sigmoid_bias``).
        num_experts: E.
        slots: k when every token has exactly k pairs laid out token-major, else None.
        dropped: (T,) bool, tokens that reached no routed expert (capacity overflow), or None.
        aux_losses: name -> scalar loss, already multiplied by its coefficient.
        valid: (T,) bool, the real tokens when the router kept padding rows in its grid (expert
            choice given a token mask), or None when every row is a token.
    """

    token_index: Tensor
    expert_index: Tensor
    weight: Tensor
    logits: Tensor
    probs: Tensor
    num_experts: int
    slots: int | None = None
    dropped: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    valid: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """T, the rows of the routing grid (padding included when ``valid`` is set)."""
        return self.logits.shape[0]

    @property
    def num_real_tokens(self) -> int:
        """The tokens that are not padding (:attr:`num_tokens` when ``valid`` is None)."""
        return self.num_tokens if self.valid is None else int(self.valid.sum())

    def expert_load(self) -> Tensor:
        """(E,) number of (token, expert) pairs each expert processes."""
        return expert_counts(self.expert_index, self.num_experts)

    def topk_view(self) -> tuple[Tensor, Tensor]:
        """(T, k) expert indices and weights, for token-choice routing without dropping."""
        if self.slots is None:
            raise ValueError("this routing has a variable number of experts per token; use the pair lists")
        k = self.slots
        return self.expert_index.view(-1, k), self.weight.view(-1, k)

    def detach(self) -> Routing:
        """A copy with every tensor detached (for recording and analysis)."""
        return Routing(
            token_index=self.token_index.detach(),
            expert_index=self.expert_index.detach(),
            weight=self.weight.detach(),
            logits=self.logits.detach(),
            probs=self.probs.detach(),
            num_experts=self.num_experts,
            slots=self.slots,
            dropped=None if self.dropped is None else self.dropped.detach(),
            aux_losses={k: v.detach() for k, v in self.aux_losses.items()},
            valid=self.valid,
        )


def expert_counts(expert_index: Tensor, num_experts: int) -> Tensor:
    """(E,) long: how often each expert id in [0, E) occurs in ``expert_index``.

    ``torch.bincount`` reads its input's maximum back to the host on CUDA (a device sync per MoE
    layer); on accelerators the count is a scatter-add that stays on the device.
    """
    flat = expert_index.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=num_experts)[:num_experts]
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def token_choice(expert_index: Tensor, weight: Tensor, **kwargs) -> Routing:
    """Build a :class:`Routing` from (T, k) token-choice decisions (no dropping)."""
    tokens, k = expert_index.shape
    token_index = torch.arange(tokens, device=expert_index.device).repeat_interleave(k)
    return Routing(
        token_index=token_index,
        expert_index=expert_index.reshape(-1),
        weight=weight.reshape(-1),
        slots=k,
        **kwargs,
    )
