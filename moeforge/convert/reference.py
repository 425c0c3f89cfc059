"""The reference an export is verified against, kept in memory or spilled to a scratch directory.

The reference model is assembled from the converted weights by module attribute
(:func:`moeforge.models.build.model_from_parts`), independently of every format's key table.
For a model small enough to hold twice it is kept in memory (and becomes ``report.model``). For
a large model only the embeddings, the final norm/head and the first layers are kept: tensors
copied unchanged from the dense checkpoint are read from it again at the end, converted FFN
weights are written to a scratch directory as they are produced, so the streaming conversion
holds no more than one layer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ..formats.export import DenseLayerWeights, MoELayerWeights
from ..utils.io import save_safetensors

_MOE_FIELDS = ("router", "gate_up", "down", "shared_gate", "shared_up", "shared_down")
_DENSE_FIELDS = ("gate", "up", "down")


class ReferenceStore:
    """Non-FFN tensors by key plus FFN weights per layer, in memory or on disk (``spill_dir``)."""

    def __init__(self, spill_parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=".moeforge-reference-", dir=spill_parent)) if spill_parent else None
        self.state: dict[str, torch.Tensor] = {}
        self.ffn: dict[int, MoELayerWeights | DenseLayerWeights] = {}
        self._files = 0
        self._lazy: list[tuple[str, str, torch.dtype]] = []
        self._read = None

    @property
    def spilled(self) -> bool:
        return self.dir is not None

    def _save(self, tensors: dict[str, torch.Tensor]) -> None:
        self._files += 1
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, self.dir / f"part-{self._files:05d}.safetensors")

    def add_from_source(self, key: str, source_key: str, dtype: torch.dtype, read) -> None:
        """A tensor copied unchanged from the dense checkpoint: when spilled, it is read again from
        the source at :meth:`load` instead of being written twice (``read``: key -> tensor)."""
        if self.dir is None:
            self.state[key] = read(source_key).to(dtype)
        else:
            self._lazy.append((key, source_key, dtype))
            self._read = read

    def add_tensors(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self.dir is None:
            self.state.update(pairs)
        else:
            self._save({f"state/{k}": v for k, v in pairs})

    def add_ffn(self, index: int, weights: MoELayerWeights | DenseLayerWeights) -> None:
        if self.dir is None:
            self.ffn[index] = weights
            return
        if isinstance(weights, DenseLayerWeights):
            tensors = {f"dense/{index}/{f}": getattr(weights, f) for f in _DENSE_FIELDS}
        else:
            tensors = {f"moe/{index}/{f}": getattr(weights, f) for f in _MOE_FIELDS if getattr(weights, f) is not None}
            tensors.update({f"extra/{index}/{k}": v for k, v in weights.router_extra.items()})
        self._save(tensors)

    def load(self, exclude: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[int, MoELayerWeights | DenseLayerWeights]]:
        """(state by key, FFN weights by layer), without the state keys in ``exclude``."""
        if self.dir is None:
            return {k: v for k, v in self.state.items() if k not in exclude}, self.ffn
        state: dict[str, torch.Tensor] = {key: self._read(src).to(dtype) for key, src, dtype in self._lazy
                                          if key not in exclude}
        parts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for path in sorted(self.dir.glob("part-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    kind, rest = key.split("/", 1)
                    if kind == "state":
                        if rest not in exclude:
                            state[rest] = f.get_tensor(key)
                    else:
                        index, name = rest.split("/", 1)
                        parts.setdefault((kind, int(index)), {})[name] = f.get_tensor(key)
        ffn: dict[int, MoELayerWeights | DenseLayerWeights] = {}
        for (kind, index), t in parts.items():
            if kind == "dense":
                ffn[index] = DenseLayerWeights(t["gate"], t["up"], t["down"])
            elif kind == "moe":
                extra = parts.get(("extra", index), {})
                ffn[index] = MoELayerWeights(t["router"], t["gate_up"], t["down"], t.get("shared_gate"), t.get("shared_up"),
                                             t.get("shared_down"), 1.0, dict(extra))
        return state, ffn

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.state, self.ffn = {}, {}
