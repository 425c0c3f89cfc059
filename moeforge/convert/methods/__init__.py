"""Expert construction methods (``--method``), registered in :data:`METHODS`.

=================  =====================================================================
random             LLaMA-MoE IndependentRandom: seeded shuffle into equal neuron groups
cluster            LLaMA-MoE IndependentClustering: balanced k-means on normalised W_up rows
coactivation       balanced k-means on each neuron's contribution profile over calibration tokens
importance         LLaMA-MoE SharingInner / SharingInter (shared experts) by |a . dL/da|
upcycle            sparse upcycling: every expert a copy (optional noise / partial re-init)
granular-upcycle   G parts replicated E/G times, virtual-group router, Megatron-LM scaling
merge              expert e = the FFN of the e-th of several dense models (mergekit-moe, BTX)
=================  =====================================================================
"""

from . import importance, merge, split, upcycle  # noqa: F401  (registration)
from .base import METHODS, DenseFFN, LayerCalibration, LayerContext, LayerExperts, Method, experts_from_groups, get_method
from .kmeans import balanced_kmeans

__all__ = [
    "METHODS",
    "DenseFFN",
    "LayerCalibration",
    "LayerContext",
    "LayerExperts",
    "Method",
    "balanced_kmeans",
    "experts_from_groups",
    "get_method",
]
