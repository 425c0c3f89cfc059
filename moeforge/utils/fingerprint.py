"""Short hashes that identify a model's weights without reading all of them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


def _positions(numel: int, samples: int) -> torch.Tensor:
    """``min(numel, samples)`` evenly spaced indices from 0 to numel - 1, in exact integer arithmetic
    (a float32 ``linspace`` rounds its last position up to ``numel`` once numel passes 2**24)."""
    steps = min(numel, samples)
    if steps == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.arange(steps, dtype=torch.long) * (numel - 1) // (steps - 1)


def sampled_digest(
    tensors: Iterable[tuple[str | None, torch.Tensor]], samples: int = 64, *, via: torch.dtype | None = None
) -> str:
    """16 hex digits of SHA-256 over each tensor's name (when given), shape and ``samples`` evenly
    spaced values, floating values rounded to bfloat16 first, so a float32 and a bfloat16 copy of
    the same weights agree while other weights (or shapes, or names) do not.

    ``via=torch.float16`` rounds floating values to float16 before bfloat16: a float16 copy then
    agrees with the float32 original (float32 -> float16 -> bfloat16 rounds differently from
    float32 -> bfloat16 for ~6% of values, so the plain digest of a float16 copy never matches)."""
    h = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach()
        if name is not None:
            h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        sample = flat[_positions(flat.numel(), samples).to(flat.device)].cpu()
        if sample.is_floating_point():
            if via is not None:
                sample = sample.to(via)
            sample = sample.float().to(torch.bfloat16).view(torch.int16)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


#: a digest of some weights, given the ``via`` rounding of :func:`sampled_digest` (None or float16)
Digest = Callable[[torch.dtype | None], str]


def fingerprints(digest: Digest) -> dict[str, str]:
    """The two digests a saved record keeps of the weights it was made for: ``fingerprint`` (matched by
    float32 and bfloat16 copies) and ``fingerprint_fp16`` (matched by float16 copies)."""
    return {"fingerprint": digest(None), "fingerprint_fp16": digest(torch.float16)}


def fingerprints_match(saved: Mapping[str, Any], digest: Digest) -> bool:
    """Whether a record of :func:`fingerprints` names the weights ``digest`` describes: either of its
    digests matches (computed only as needed; a record without ``fingerprint_fp16`` predates it)."""
    if saved.get("fingerprint") is not None and digest(None) == saved["fingerprint"]:
        return True
    fp16 = saved.get("fingerprint_fp16")
    return fp16 is not None and digest(torch.float16) == fp16
