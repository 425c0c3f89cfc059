"""Export verification: reload what was written and compare its logits with moeforge's reference.

Two ways, chosen by :mod:`moeforge.convert.api`:

* whole model (small models): the export is reopened whole, in float32, the way its users open it,
  and its logits compared with the reference model's;
* first layers (large models): a config truncated to the first ``n`` layers is placed beside
  links to the written shards, opened the same way but in the export's own dtype, and run by
  :func:`layerwise_logits`, which keeps float32 copies of one module at a time. The reference
  runs the same way, so the check's peak memory stays near one layer whatever the model's width
  (about 2x the largest layer for LLaMA-2-7B shapes, ``benchmarks/convert.py``).

Both compare in float32: every weight is upcast exactly, so the two computations differ only in
operation order and a routing near-tie cannot flip between them the way it could in float16.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import MoeforgeError
from ..formats.export import Exporter

#: layers kept for the logits check when the whole model is too large to reload
VERIFY_LAYERS = 1
#: verification tolerance on logits: max |a - b| <= RTOL * max(1, max |reference|)
VERIFY_RTOL = 1e-4
VERIFY_TEXT = "Mixture-of-experts models route each token to a few experts, so most weights stay idle."
#: rows of the LM head multiplied at a time by :func:`layerwise_logits`
HEAD_CHUNK_ROWS = 4096


def verification_ids(tokenizer, vocab: int) -> Tensor:
    """(2, S) token ids: the tokenised :data:`VERIFY_TEXT` and its reverse, or seeded random ids."""
    if tokenizer is not None:
        ids = tokenizer(VERIFY_TEXT, add_special_tokens=False).input_ids[:24]
        if len(ids) >= 8 and max(ids) < vocab:
            ids = torch.tensor(ids)
            return torch.stack([ids, ids.flip(0)])
    g = torch.Generator().manual_seed(1234)
    return torch.randint(vocab, (2, 24), generator=g)


# ---------------------------------------------------------------------------------------- low memory
@contextmanager
def _one_module_at_a_time(body: nn.Module, release: Callable[[], object]):
    """Upcast each module's own parameters to float32 just before it runs and release them after.

    Modules that upcast their own weights piecewise (``upcasts_weights_per_expert``: moeforge's
    stacked experts) keep theirs. The model is consumed: every module that ran is left with empty
    parameters, so it serves one forward pass. A module run twice raises (its parameters are gone), which is caught below.
    """

    def before(module: nn.Module, _args) -> None:
        if getattr(module, "upcasts_weights_per_expert", False):  # moeforge's experts: one expert at a time
            return
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()

    def after(module: nn.Module, _args, _out) -> None:
        for p in module.parameters(recurse=False):
            p.data = p.data.new_empty(0)
        release()

    handles = []
    for module in body.modules():
        if next(module.parameters(recurse=False), None) is not None:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layerwise_logits(body: nn.Module, embeds: Tensor, head: Tensor | Callable[[], Tensor],
                     release: Callable[[], object] = lambda: None) -> Tensor:
    """Float32 logits of a decoder on given input embeddings, one module in float32 at a time.

    Args:
        body: the decoder without embedding lookup or LM head (``model.model`` of a causal LM); it
            must accept ``inputs_embeds`` and return ``last_hidden_state`` (final norm applied). Its
            parameters may be float16/bfloat16; they are consumed (see :func:`_one_module_at_a_time`).
        embeds: (B, S, H) input embeddings.
        head: (V, H) LM head weight, or a callable returning it once the body has run (so a head
            read from disk need not be in memory at the same time as the body).
        release: called after each module and each block of the head, e.g. to drop the pages of
            memory-mapped files already read (:func:`~moeforge.utils.memory.release_file_pages`).
    Returns:
        (B, S, V) float32 logits, the head applied in blocks of :data:`HEAD_CHUNK_ROWS` rows.
    """
    with torch.no_grad(), _one_module_at_a_time(body, release):
        try:
            hidden = body(inputs_embeds=embeds.float(), use_cache=False).last_hidden_state.float()
        except RuntimeError as err:
            raise MoeforgeError(f"internal error: the layer-by-layer logits check could not run the model ({err})") from None
    del body
    weight = head() if callable(head) else head
    blocks = []
    with torch.no_grad():
        for r in range(0, weight.shape[0], HEAD_CHUNK_ROWS):
            blocks.append(hidden @ weight[r:r + HEAD_CHUNK_ROWS].float().T)
            release()
    return torch.cat(blocks, dim=-1)


# ---------------------------------------------------------------------------------------- export side
@contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bar (a truncated config leaves later layers'
    keys unused, which it would list as a warning)."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def truncated_config_dict(cfg: dict, n: int) -> dict:
    """A model config (as a dict) cut to its first ``n`` layers, per-layer lists and overrides included."""
    cfg = dict(cfg, num_hidden_layers=n)
    for key in ("mlp_only_layers", "moe_layers"):
        if cfg.get(key) is not None:
            cfg[key] = [i for i in cfg[key] if i < n]
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:n]
    if cfg.get("moe_overrides"):
        cfg["moe_overrides"] = {k: v for k, v in cfg["moe_overrides"].items() if int(k) < n} or None
    return cfg


def _truncated_config_dir(directory: Path, n: int) -> Path:
    """A scratch directory beside ``directory``: its config cut to ``n`` layers, links to its shards."""
    scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=directory.parent))
    cfg = truncated_config_dict(json.loads((directory / "config.json").read_text()), n)
    (scratch / "config.json").write_text(json.dumps(cfg))
    for f in directory.iterdir():
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
            os.symlink(f, scratch / f.name)
    return scratch


def _open_export(exporter: Exporter, directory: Path, dtype: torch.dtype):
    try:
        with _quiet_transformers(), warnings.catch_warnings():
            # a Qwen2-MoE export without shared experts holds zero-width shared-expert weights, whose
            # initialisation torch reports as a no-op (to the user of a conversion, noise from the check)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            return exporter.load(directory, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any failure to open the export is a verification failure
        raise MoeforgeError(
            f"export verification failed: the written {exporter.name} directory does not load ({type(err).__name__}: "
            f"{err}); the export was discarded."
        ) from None


def export_logits(exporter: Exporter, directory: Path, ids: Tensor, *, layers: int | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Logits of the written export on ``ids``, opened the way its users open it.

    ``layers=None`` opens the whole model in float32. Otherwise only its first ``layers`` layers are
    opened, in ``dtype`` (the dtype it was written in), and run by :func:`layerwise_logits`.
    """
    if layers is None:
        loaded = _open_export(exporter, directory, torch.float32)
        with torch.no_grad():
            return loaded(ids, use_cache=False).logits.float()
    from ..utils.memory import release_file_pages

    def release() -> None:  # pages of the written shards already read (the shards may be GBs)
        release_file_pages(directory)

    scratch = _truncated_config_dir(directory, layers)
    try:
        loaded = _open_export(exporter, scratch, dtype)
        release()
        embedding = loaded.get_input_embeddings()
        embeds = embedding.weight[ids].float()
        head = loaded.get_output_embeddings().weight
        if head is not embedding.weight:
            embedding.weight = None  # release the table (the body is run on embeddings)
        body = loaded.base_model
        del loaded, embedding
        return layerwise_logits(body, embeds, head, release)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_logits(got: Tensor, want: Tensor, exporter_name: str) -> float:
    """Largest |got - want|; raises :class:`MoeforgeError` beyond :data:`VERIFY_RTOL`."""
    if got.shape != want.shape:
        raise MoeforgeError(f"export verification failed: logits of shape {tuple(got.shape)}, expected {tuple(want.shape)}.")
    diff = float((got - want).abs().max())
    bound = VERIFY_RTOL * max(1.0, float(want.abs().max()))
    if not diff <= bound:
        raise MoeforgeError(
            f"export verification failed: the reloaded {exporter_name} model's logits differ from moeforge's by up to "
            f"{diff:.3g} (allowed {bound:.3g}); the export was discarded. This is a bug in the export; please report it."
        )
    return diff
