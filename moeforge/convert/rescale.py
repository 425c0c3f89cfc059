"""Output scale of the routed experts (``--rescale``).

y = s * sum_{e in top-k} w_e E_e(x) + shared(x)   (:class:`~moeforge.moe.MoELayer`, ``output_scale``)

* ``none``: s = 1.
* a number: that s in every layer.
* ``auto``: the method's published default: E/k for split methods (LLaMA-MoE, Zhu et al. 2024;
  their released 2/8 model uses 4.0), G or E*G/k for (granular) upcycling (Megatron-LM).
* ``layerwise``: per layer, s_l = mean_t ||y_t - shared_t|| / mean_t ||routed_t||, so the
  routed part's output norm matches the dense FFN's on calibration tokens (LLaMA-MoE's
  layer-wise variant).
* ``fit``: per layer, the least-squares s_l = <y - shared, routed> / <routed, routed>, the scale
  with the smallest output error (norm matching over-scales whenever the routed output is not
  parallel to the dense output, which after splitting it never is).

moeforge keeps s in the layer config (``moe_overrides`` for per-layer values); stock formats
get it folded into ``down_proj``.
"""

from __future__ import annotations

from torch import Tensor

from .config import ConvertConfig


def fixed_scale(cfg: ConvertConfig, default_scale: float) -> float | None:
    """The scale when it does not depend on data; None for ``layerwise``."""
    if cfg.rescale == "none":
        return 1.0
    if cfg.rescale == "auto":
        return float(default_scale)
    if cfg.rescale in ("layerwise", "fit"):
        return None
    return float(cfg.rescale)


def norm_matching_scale(y: Tensor, routed: Tensor, shared: Tensor | None = None) -> float:
    """s with mean ||s * routed|| = mean ||y - shared|| over tokens (rows)."""
    target = y if shared is None else y - shared
    denom = float(routed.norm(dim=-1).mean())
    if denom <= 0:
        return 1.0
    return float(target.norm(dim=-1).mean()) / denom


def least_squares_scale(y: Tensor, routed: Tensor, shared: Tensor | None = None) -> float:
    """argmin_s ||y - shared - s * routed||^2 (``--rescale fit``)."""
    target = y if shared is None else y - shared
    denom = float((routed * routed).sum())
    if denom <= 0:
        return 1.0
    return max(float((target * routed).sum()) / denom, 1e-6)
