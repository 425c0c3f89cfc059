"""Calibration data for the data-driven steps, computed one layer at a time.

:class:`DenseRunner` runs the dense model layer by layer in float32 on calibration windows,
reading each layer's tensors from the source only while it is needed, so collecting FFN inputs
costs one layer of memory plus the (tokens, hidden) activations. For layer i it yields
:class:`~moeforge.convert.methods.LayerCalibration` with the FFN input x (post-attention
RMSNorm output) and the dense FFN output y, on the dense model's own trajectory.

:func:`importance_pass` adds LLaMA-MoE's neuron importance: a forward pass that keeps every
layer's input, the language-modelling loss, then a backward pass run layer by layer in reverse
(recomputing each layer from its stored input), accumulating |sum_t a_j(t) dL/da_j(t)| per
window at every FFN. Windows are grouped into E data clusters by balanced k-means on their mean
final hidden state (LLaMA-MoE clusters its training text; we cluster the calibration text).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MoeforgeError
from .methods.base import DenseFFN, LayerCalibration
from .methods.kmeans import balanced_kmeans
from .source import ATTN, EMBED, FINAL_NORM, IN_NORM, LM_HEAD, POST_NORM, DenseSource

DEFAULT_CALIBRATION = "prose+code"


# ------------------------------------------------------------------------------------ text
def calibration_texts(spec) -> list[str]:
    """Documents named by ``spec``: built-in domains joined with '+', a .txt/.jsonl path, or a list."""
    from ..data.builtin import BUILTIN_DOMAINS, builtin_documents

    if spec is None:
        spec = DEFAULT_CALIBRATION
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(s, str) for s in spec):
            raise MoeforgeError("calibration must be a non-empty list of strings.")
        return list(spec)
    text = str(spec)
    parts = text.split("+")
    if all(p in BUILTIN_DOMAINS for p in parts):
        docs_per_domain = [builtin_documents(p, "train") for p in parts]
        # interleave domains so any prefix of the token stream mixes them
        out: list[str] = []
        for i in range(max(len(d) for d in docs_per_domain)):
            out.extend(d[i] for d in docs_per_domain if i < len(d))
        return out
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return _calibration_file(path)
        except UnicodeDecodeError:
            raise MoeforgeError(f"calibration file {path} is not UTF-8 text; give a .txt or .jsonl file of text.") from None
    raise MoeforgeError(
        f"calibration {text!r} is neither a built-in domain ({', '.join(sorted(BUILTIN_DOMAINS))}, joined with '+') "
        "nor an existing .txt/.jsonl file."
    )


def _calibration_file(path: Path) -> list[str]:
    """The documents of a calibration file: one per JSONL line (its ``text`` field), else the whole file."""
    if path.suffix != ".jsonl":
        return [path.read_text()]
    import json

    docs = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoeforgeError(f"{path}:{n + 1} is not valid JSON ({err}).") from None
        doc = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(doc, str):
            raise MoeforgeError(f"{path}:{n + 1} has no string field 'text'; calibration JSONL needs one per line.")
        docs.append(doc)
    return docs


def calibration_windows(tokenizer, spec, total_tokens: int, seq_len: int) -> Tensor:
    """(N, seq_len) token windows, N = total_tokens // seq_len, cut from the calibration text.

    Raises :class:`MoeforgeError` when the text is shorter than ``seq_len`` tokens.
    """
    docs = calibration_texts(spec)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        ids.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        if len(ids) >= total_tokens:
            break
    n = min(len(ids), total_tokens) // seq_len
    if n == 0 and total_tokens < seq_len:
        raise MoeforgeError(
            f"calibration_tokens (--calibration-tokens) {total_tokens} is less than one calibration window of "
            f"{seq_len} tokens; use at least {seq_len}."
        )
    if n == 0:
        raise MoeforgeError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; give more text."
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def domain_windows(tokenizer, texts: list[str], total_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Calibration windows for ``--gate-init domain``: ((N, seq_len) ids, (N * seq_len,) labels).

    ``texts[e]`` (a built-in domain or a .txt/.jsonl file) gives expert e an equal share of
    ``total_tokens``; every token of its windows is labelled e.
    """
    share = total_tokens // len(texts)
    if share < seq_len:
        raise MoeforgeError(
            f"--gate-init domain splits --calibration-tokens {total_tokens} over {len(texts)} experts, {share} each, "
            f"less than one window of {seq_len}; use --calibration-tokens {seq_len * len(texts)} or more."
        )
    windows, labels = [], []
    for e, spec in enumerate(texts):
        try:
            w = calibration_windows(tokenizer, spec, share, seq_len)
        except MoeforgeError as err:
            raise MoeforgeError(f"--expert-data {spec!r} (expert {e}): {err}") from None
        windows.append(w)
        labels.append(torch.full((w.numel(),), e, dtype=torch.long))
    return torch.cat(windows), torch.cat(labels)


# ------------------------------------------------------------------------------------ runner
class DenseRunner:
    """Run a dense source model layer by layer in float32 (attention from transformers' LLaMA)."""

    def __init__(self, source: DenseSource, *, batch_windows: int = 8) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from ..models.configuration_moeforge import MoeforgeConfig

        self.source = source
        self.config = MoeforgeConfig(**source.base, moe_layers=[])
        self.config._attn_implementation = "sdpa"
        self.rotary = LlamaRotaryEmbedding(config=self.config)
        self.batch = batch_windows
        self.eps = self.config.rms_norm_eps

    def _f32(self, key: str) -> Tensor:
        return self.source.get(key).float()

    def _rms(self, h: Tensor, weight: Tensor) -> Tensor:
        variance = h.pow(2).mean(-1, keepdim=True)
        return weight * (h * torch.rsqrt(variance + self.eps))

    def embed(self, windows: Tensor) -> Tensor:
        """(N, S) ids -> (N, S, H) float32 embeddings."""
        return F.embedding(windows, self._f32(EMBED))

    def attention_module(self, i: int):
        from transformers.models.llama.modeling_llama import LlamaAttention

        with torch.device("meta"):
            attn = LlamaAttention(self.config, layer_idx=0)
        state = {}
        for p in ("q", "k", "v", "o"):
            state[f"{p}_proj.weight"] = self._f32(ATTN.format(i=i, p=p, w="weight"))
            if self.config.attention_bias:
                key = ATTN.format(i=i, p=p, w="bias")
                keys = self.source.keys()
                state[f"{p}_proj.bias"] = self._f32(key) if key in keys else torch.zeros(state[f"{p}_proj.weight"].shape[0])
        attn.load_state_dict(state, assign=True)
        attn.requires_grad_(False)
        return attn.eval()

    def layer_parts(self, i: int):
        """(attention module, input norm weight, post-attention norm weight) of layer ``i``."""
        return self.attention_module(i), self._f32(IN_NORM.format(i=i)), self._f32(POST_NORM.format(i=i))

    def _positions(self, h: Tensor):
        pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        return self.rotary(h, pos)

    def attention_block(self, parts, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, S, H) -> (h after attention + residual, FFN input x)."""
        attn, w_in, w_post = parts
        a, _ = attn(self._rms(h, w_in), position_embeddings=self._positions(h), attention_mask=None)
        h_mid = h + a
        return h_mid, self._rms(h_mid, w_post)

    @torch.no_grad()
    def layer(self, i: int, h: Tensor, ffn: DenseFFN) -> tuple[Tensor, LayerCalibration]:
        """Run layer ``i`` on h (N, S, H); return (next h, the layer's calibration x and y)."""
        parts = self.layer_parts(i)
        nxt, xs, ys = [], [], []
        for start in range(0, h.shape[0], self.batch):
            hb = h[start : start + self.batch]
            h_mid, x = self.attention_block(parts, hb)
            y = ffn(x.reshape(-1, x.shape[-1])).view_as(x)
            nxt.append(h_mid + y)
            xs.append(x.reshape(-1, x.shape[-1]))
            ys.append(y.reshape(-1, y.shape[-1]))
        return torch.cat(nxt), LayerCalibration(x=torch.cat(xs), y=torch.cat(ys))

    def head_weights(self) -> tuple[Tensor, Tensor]:
        norm = self._f32(FINAL_NORM)
        head = self._f32(EMBED if self.source.tied else LM_HEAD)
        return norm, head


# ------------------------------------------------------------------------------------ importance
def importance_pass(
    runner: DenseRunner,
    windows: Tensor,
    num_clusters: int,
    *,
    generator: torch.Generator,
    read_ffn: Callable[[int], DenseFFN],
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Per-layer neuron importance per data cluster.

    Args:
        runner: the dense layer runner.
        windows: (N, S) calibration token windows; N >= num_clusters.
        num_clusters: C, one data cluster per routed expert.
        read_ffn: layer index -> that layer's dense FFN.
    Returns:
        (importance, cluster_of_window): importance[i] is (C, I) float32 for layer i, the mean
        over the windows of each cluster of |sum_t a_j(t) dL/da_j(t)|; cluster_of_window (N,).
    """
    n_windows = windows.shape[0]
    if n_windows < num_clusters:
        raise MoeforgeError(
            f"the importance method clusters calibration windows into {num_clusters} groups but there are only "
            f"{n_windows} windows of {windows.shape[1]} tokens; raise calibration_tokens (--calibration-tokens) to at "
            f"least {num_clusters * windows.shape[1]}."
        )
    if windows.shape[1] < 2:
        raise MoeforgeError(
            f"the importance method needs calibration windows of at least 2 tokens (a next-token loss), got "
            f"{windows.shape[1]}; raise calibration_seq_len (--calibration-seq-len)."
        )
    num_layers = runner.source.num_layers
    say = progress or (lambda _m: None)
    # forward, keeping every layer's input
    h = runner.embed(windows)
    inputs = []
    for i in range(num_layers):
        inputs.append(h)
        h, _ = runner.layer(i, h, read_ffn(i))
        say(f"importance: forward layer {i + 1}/{num_layers}")
    norm_w, head = runner.head_weights()
    with torch.no_grad():
        feats = torch.nn.functional.normalize(runner._rms(h, norm_w).mean(dim=1), dim=-1)
    clusters, _ = balanced_kmeans(feats, num_clusters, iters=20, generator=generator)
    # gradient of the mean next-token loss w.r.t. the last hidden state
    count = windows.shape[0] * (windows.shape[1] - 1)
    grad = torch.empty_like(h)
    for start in range(0, n_windows, runner.batch):
        hb = h[start : start + runner.batch].detach().requires_grad_(True)
        logits = runner._rms(hb, norm_w) @ head.T
        target = windows[start : start + runner.batch, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum") / count
        (g,) = torch.autograd.grad(loss, hb)
        grad[start : start + runner.batch] = g
    del h
    importance: list[Tensor] = [None] * num_layers  # type: ignore[list-item]
    for i in reversed(range(num_layers)):
        ffn = read_ffn(i)
        parts = runner.layer_parts(i)
        gate, up, down = ffn.gate.float(), ffn.up.float(), ffn.down.float()
        per_window = torch.empty(n_windows, ffn.intermediate_size)
        new_grad = torch.empty_like(grad)
        for start in range(0, n_windows, runner.batch):
            hb = inputs[i][start : start + runner.batch].detach().requires_grad_(True)
            h_mid, x = runner.attention_block(parts, hb)
            act = F.silu(x @ gate.T) * (x @ up.T)
            act.retain_grad()
            out = h_mid + act @ down.T
            out.backward(grad[start : start + runner.batch])
            per_window[start : start + runner.batch] = (act.detach() * act.grad).sum(dim=1).abs()
            new_grad[start : start + runner.batch] = hb.grad
        grad = new_grad
        inputs[i] = None  # free as we go
        imp = torch.zeros(num_clusters, ffn.intermediate_size).index_add_(0, clusters, per_window)
        imp /= torch.bincount(clusters, minlength=num_clusters).clamp_min(1).unsqueeze(1).float()
        importance[i] = imp
        say(f"importance: backward layer {num_layers - i}/{num_layers}")
    return importance, clusters

