"""Dense -> MoE conversion: expert construction, router initialisation, rescaling, refinement, export.

``moeforge.convert(model_or_path, out=..., method=..., experts=..., top_k=..., ...)`` returns a
:class:`ConvertReport`; see :mod:`moeforge.convert.api`. Options are the fields of
:class:`ConvertConfig`. Modules:

=================  ===========================================================
config             ConvertConfig, the validated options
source             the dense model: families, key table, tensor access
streaming          tensor-by-tensor safetensors reader and planned sharded writer
calibration        calibration text, layer-by-layer dense runner, importance pass
methods/           expert construction (random, cluster, coactivation, importance, upcycling)
gate_init          router initialisation (random, centroid, activation)
rescale            output scale (auto, none, number, layerwise)
refine             layer-wise local distillation
layer              one layer through all of the above
api                convert(): streaming loop, export, verification, evaluation
=================  ===========================================================
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from .config import FORMAT_NAMES, GATE_INIT_NAMES, METHOD_NAMES, REFINE_NAMES, ConvertConfig

if TYPE_CHECKING:  # pragma: no cover
    from .api import ConvertReport, convert

__all__ = ["convert", "ConvertReport", "ConvertConfig", "METHOD_NAMES", "GATE_INIT_NAMES", "REFINE_NAMES", "FORMAT_NAMES"]


class _ConvertPackage(types.ModuleType):
    """``moeforge.convert`` is both this package and the conversion function: calling the package
    calls :func:`moeforge.convert.api.convert` (so ``moeforge.convert(...)`` and
    ``moeforge.convert.ConvertConfig`` both work)."""

    def __call__(self, model_or_path, out=None, **kwargs):
        from .api import convert as _convert

        return _convert(model_or_path, out, **kwargs)


sys.modules[__name__].__class__ = _ConvertPackage


def __getattr__(name: str):
    # the API module imports the export formats, which import this package's streaming module:
    # load it on first use so that either side can be imported first
    if name in ("convert", "ConvertReport"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
