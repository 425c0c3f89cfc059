"""``CALMConfig``: where and how an augmenting model is connected to an anchor (Bansal et al. 2024).

Naming follows the paper: the *anchor* m_B keeps producing the output and gains a skill; the
*augmenting* model m_A lends its hidden states. ``num_connections = n`` connects the outputs of
every (N_A/n)-th layer of m_A to the outputs of every (N_B/n)-th layer of m_B (1-based: layers
N/n, 2N/n, ..., N; the paper uses N_A/n = 4). Explicit layer lists override that spacing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import MoeforgeError, closest, require
from ..utils.validation import check_field_types


def evenly_spaced_layers(num_layers: int, n: int) -> list[int]:
    """0-based indices of the outputs of layers N/n, 2N/n, ..., N (1-based), rounded down.

    >>> evenly_spaced_layers(12, 3)
    [3, 7, 11]
    """
    return [((k + 1) * num_layers) // n - 1 for k in range(n)]


@dataclass
class CALMConfig:
    """Composition layers between an augmenting model m_A and an anchor m_B.

    Each connection k projects m_A's hidden states after layer ``augmenting_layers[k]``
    (D_A -> D_B), lets m_B's hidden states after layer ``anchor_layers[k]`` cross-attend to them
    (queries from m_B, keys/values from m_A, m_B's head count, causal), and adds the result to
    m_B's residual stream before its next layer.
    """

    num_connections: int | None = None
    """n, the number of (m_A layer, m_B layer) pairs; at most the layer count of either model.
    Default: the length of ``augmenting_layers`` / ``anchor_layers`` when given, else 4."""
    augmenting_layers: list[int] | None = None
    """Explicit 0-based m_A layers (length n, increasing); default: every (N_A/n)-th layer."""
    anchor_layers: list[int] | None = None
    """Explicit 0-based m_B layers (length n, increasing); default: every (N_B/n)-th layer."""
    num_heads: int | None = None
    """Cross-attention heads; default: the anchor's attention head count (as in the paper)."""
    norm: bool = True
    """RMS-normalise both inputs of each cross-attention (m_A states before the projection, m_B
    states before the queries). The paper does not specify normalisation; LLaMA residual streams
    grow with depth, so it is on by default. False gives the paper's bare projections."""
    rope: bool = True
    """Rotate cross-attention queries and keys by their token positions (rotary embedding with the
    anchor's base), so heads can attend by relative position (e.g. to the augmenting state at the
    same position). The paper does not specify this; False gives content-only cross-attention."""
    dropout: float = 0.0
    """Attention-probability dropout inside the cross-attention, training only."""
    init_std: float = 0.02
    """Std of the normal init of the projection and q/k/v weights; the output projection starts at zero."""

    def __post_init__(self) -> None:
        check_field_types(self, skip=("augmenting_layers", "anchor_layers"), prefix="compose.")
        if self.num_connections is None:
            given = [x for x in (self.augmenting_layers, self.anchor_layers) if isinstance(x, (list, tuple))]
            self.num_connections = len(given[0]) if given else 4
        require(
            isinstance(self.num_connections, int) and not isinstance(self.num_connections, bool)
            and self.num_connections >= 1,
            f"compose.num_connections must be a positive integer, got {self.num_connections!r}; "
            "the paper connects every 4th layer (num_connections = layers / 4).",
        )
        for name in ("augmenting_layers", "anchor_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            require(
                isinstance(layers, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers),
                f"compose.{name} must be a list of 0-based layer indices, got {layers!r}.",
            )
            layers = list(layers)
            setattr(self, name, layers)
            require(
                len(layers) == self.num_connections,
                f"compose.{name} lists {len(layers)} layers but num_connections={self.num_connections}; "
                f"give exactly {self.num_connections} indices or drop {name} to use even spacing.",
            )
            require(
                all(a < b for a, b in zip(layers, layers[1:])),
                f"compose.{name} must be strictly increasing, got {layers}.",
            )
        if self.num_heads is not None:
            require(
                isinstance(self.num_heads, int) and self.num_heads >= 1,
                f"compose.num_heads must be a positive integer or null (the anchor's head count), got {self.num_heads!r}.",
            )
        require(0.0 <= self.dropout < 1.0, f"compose.dropout must be in [0, 1), got {self.dropout!r}.")
        require(0 < self.init_std < math.inf, f"compose.init_std must be a finite number > 0, got {self.init_std!r}.")

    # ------------------------------------------------------------------ resolution against models
    def layer_pairs(self, augmenting_num_layers: int, anchor_num_layers: int) -> list[tuple[int, int]]:
        """The (m_A layer, m_B layer) pairs for models of the given depths, 0-based.

        Raises :class:`MoeforgeError` when n exceeds either depth or an explicit index is out of range.
        """
        n = self.num_connections
        limit = min(augmenting_num_layers, anchor_num_layers)
        if n > limit:
            raise MoeforgeError(
                f"num_connections={n} is more than the {augmenting_num_layers} layers of the augmenting model and "
                f"the {anchor_num_layers} of the anchor allow (at most one connection per layer of the shallower "
                f"model); choose num_connections <= {limit} (the paper uses one connection every 4 layers)."
            )
        aug = self.augmenting_layers or evenly_spaced_layers(augmenting_num_layers, n)
        anc = self.anchor_layers or evenly_spaced_layers(anchor_num_layers, n)
        for role, layers, depth in (("augmenting", aug, augmenting_num_layers), ("anchor", anc, anchor_num_layers)):
            require(
                layers[-1] < depth,
                f"compose.{role}_layers names layer {layers[-1]}, but the {role} model has layers 0..{depth - 1}.",
            )
        return list(zip(aug, anc))

    # ------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, extra_keys: tuple[str, ...] = ()) -> CALMConfig:
        """Build from a dict, refusing unknown keys with the closest valid one.

        ``extra_keys`` are keys the caller handles itself (e.g. ``augmenting``); they are skipped
        here but count as valid for the "did you mean" hint.
        """
        cls.check_keys(data, extra_keys=extra_keys)
        return cls(**{k: v for k, v in data.items() if k not in extra_keys})

    @classmethod
    def check_keys(cls, data: dict[str, Any], *, extra_keys: tuple[str, ...] = ()) -> None:
        """Refuse a non-mapping or an unknown key (naming the closest valid one)."""
        if not isinstance(data, dict):
            raise MoeforgeError(f"the compose section must be a mapping of settings, got {type(data).__name__}.")
        valid = cls.field_names() + list(extra_keys)
        for key in data:
            if key not in valid:
                raise MoeforgeError(
                    f"unknown compose setting {key!r}.{closest(str(key), valid)} "
                    f"Valid settings: {', '.join(sorted(valid))}."
                )


__all__ = ["CALMConfig", "evenly_spaced_layers"]
