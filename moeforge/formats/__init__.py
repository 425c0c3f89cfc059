"""Import and export of checkpoint formats (explicit weight-key tables).

Importers (``moeforge.load``): ``mixtral``, ``qwen2_moe``. Exporters (``moeforge convert --format``):
``mixtral``, ``qwen2_moe``, ``moeforge``; :data:`EXPORT_ORDER` is the order ``--format auto``
tries them in (the first that represents the model exactly wins).
"""

from . import mixtral, moeforge_format, qwen2_moe  # noqa: F401  registers importers and exporters
from .export import DenseLayerWeights, Exporter, ExportSpec, MoELayerWeights
from .registry import EXPORTERS, IMPORTERS, register_importer

EXPORT_ORDER = ("mixtral", "qwen2_moe", "moeforge")

__all__ = [
    "IMPORTERS",
    "EXPORTERS",
    "EXPORT_ORDER",
    "register_importer",
    "Exporter",
    "ExportSpec",
    "MoELayerWeights",
    "DenseLayerWeights",
]
