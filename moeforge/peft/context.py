"""Per-model state the adapter layers of one adapted model share: routing records and the
frozen sentence embedding. Nothing here is global: each :class:`~moeforge.peft.model.AdaptedModel`
owns one :class:`AdapterContext`, and its layers hold a reference to it.

Sentence-embedding routing (Zadouri et al. 2023, sec. 4.3 ablation) routes every token of a text
with one embedding of the text instead of the token's own activation. Here the embedding is the
mean of the frozen input-embedding vectors (padding excluded):

* encoder-decoder models (T5): the mean over the whole encoder input, one vector per sequence,
  used by every encoder and decoder layer (the paper's setup);
* decoder-only models: the *prefix* mean at each position (tokens 0..t), so routing never looks at
  future tokens; during cached generation the running sum is carried from step to step, so the
  embedding at each generated token equals the one teacher-forced training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import MoeforgeError


@dataclass
class ModuleUsage:
    """Routing statistics of one adapted module, accumulated over recorded forwards.

    ``prob_sum`` (E,) float64: summed router weights; ``top1`` (E,) int64: how often each expert had
    the largest weight; ``decisions``: number of routing decisions (tokens, times heads for per-head
    routing of keys/values).
    """

    prob_sum: Tensor
    top1: Tensor
    decisions: int = 0

    @property
    def mean_probs(self) -> Tensor:
        """(E,) average router weight per expert (sums to one for soft merging; with top-k routing the
        kept weights, which are not renormalised, sum to less)."""
        return (self.prob_sum / max(self.decisions, 1)).float()

    @property
    def top1_fraction(self) -> Tensor:
        """(E,) fraction of decisions whose largest weight went to each expert."""
        return (self.top1.double() / max(self.decisions, 1)).float()


class RoutingRecorder:
    """Collects router decisions of an adapted model, per module name.

    Created by :meth:`AdaptedModel.record_routing`; each adapter layer calls :meth:`add` with its
    router weights while the recorder is active. Padding positions are left out when the model was
    called with an ``attention_mask`` whose shape matches the layer's leading dimensions.
    """

    def __init__(self) -> None:
        self.usage: dict[str, ModuleUsage] = {}

    def add(self, name: str, probs: Tensor, mask: Tensor | None = None) -> None:
        """Record router weights ``probs`` (..., E); ``mask`` (B, L) selects the real tokens."""
        probs = probs.detach()
        if mask is not None and probs.dim() >= 3 and tuple(probs.shape[:2]) == tuple(mask.shape):
            probs = probs[mask.bool()]
        flat = probs.reshape(-1, probs.shape[-1]).double()
        if flat.shape[0] == 0:
            return
        entry = self.usage.get(name)
        if entry is None:
            num_experts = flat.shape[-1]
            entry = ModuleUsage(torch.zeros(num_experts, dtype=torch.float64), torch.zeros(num_experts, dtype=torch.long))
            self.usage[name] = entry
        entry.prob_sum += flat.sum(0).cpu()
        entry.top1 += torch.bincount(flat.argmax(-1).cpu(), minlength=flat.shape[-1])
        entry.decisions += flat.shape[0]

    def mean_probs(self) -> dict[str, Tensor]:
        """Module name -> (E,) average router weight."""
        return {name: u.mean_probs for name, u in self.usage.items()}

    def reset(self) -> None:
        self.usage.clear()


@dataclass
class _Running:
    """Running prefix sum of a decoder-only model's embeddings across cached generation steps."""

    total: Tensor  # (B, H)
    count: Tensor  # (B, 1)
    length: int


@dataclass
class AdapterContext:
    """State shared by the adapter layers of one adapted model.

    ``sentence``: (B, L, H) or (B, 1, H) routing embedding of the current batch (sentence routing).
    ``token_mask``: (B, L) attention mask of the current call, used to leave padding out of records.
    ``decoder_mask``: encoder-decoder models: the decoder's mask, restored once the encoder has run.
    ``recorder``: the active :class:`RoutingRecorder`, or None.
    """

    sentence: Tensor | None = None
    token_mask: Tensor | None = None
    decoder_mask: Tensor | None = None
    recorder: RoutingRecorder | None = None
    running: _Running | None = field(default=None, repr=False)

    def record(self, name: str, probs: Tensor) -> None:
        if self.recorder is not None:
            self.recorder.add(name, probs, self.token_mask)

    def sentence_for(self, x: Tensor) -> Tensor:
        """The routing embedding aligned with an activation ``x`` (B, L, d): (B, L, H) or (B, 1, H)."""
        s = self.sentence
        if s is None:
            raise MoeforgeError(
                "sentence routing needs the token ids of the text: call the adapted model with input_ids "
                "(or inputs_embeds), not its submodules directly."
            )
        if x.dim() != 3:
            raise MoeforgeError(f"sentence routing expects (batch, seq, features) activations, got shape {tuple(x.shape)}.")
        if s.shape[0] != x.shape[0]:
            if x.shape[0] % s.shape[0] != 0:
                raise MoeforgeError(
                    f"sentence routing: the embedding has batch {s.shape[0]} but a layer got batch {x.shape[0]}."
                )
            s = s.repeat_interleave(x.shape[0] // s.shape[0], dim=0)  # beams / num_return_sequences
        if s.shape[1] not in (1, x.shape[1]):
            raise MoeforgeError(
                f"sentence routing: the embedding covers {s.shape[1]} positions but a layer got {x.shape[1]}."
            )
        return s


# ------------------------------------------------------------------------ sentence embeddings
def masked_mean(embeddings: Tensor, mask: Tensor | None) -> Tensor:
    """(B, L, H), (B, L) -> (B, 1, H): the mean over unmasked positions (all positions when no mask)."""
    if mask is None:
        return embeddings.mean(dim=1, keepdim=True)
    m = mask.to(embeddings.dtype).unsqueeze(-1)
    return (embeddings * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)


def prefix_mean(
    embeddings: Tensor, mask: Tensor | None, start_total: Tensor | None = None, start_count: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal running mean: position t gets the mean of unmasked positions 0..t (plus a carried prefix).

    Returns (means (B, L, H), final total (B, H), final count (B, 1)). Positions before the first
    real token (left padding) get a zero vector.
    """
    b, length, _ = embeddings.shape
    m = torch.ones(b, length, 1, dtype=embeddings.dtype, device=embeddings.device) if mask is None \
        else mask.to(embeddings.dtype).unsqueeze(-1)
    totals = torch.cumsum(embeddings * m, dim=1)
    counts = torch.cumsum(m, dim=1)
    if start_total is not None:
        totals = totals + start_total.unsqueeze(1)
        counts = counts + start_count.unsqueeze(1)
    return totals / counts.clamp(min=1.0), totals[:, -1], counts[:, -1]
