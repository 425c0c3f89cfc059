"""A self-contained HTML page showing which expert each token went to, in every MoE layer.

The page needs no network and no server: styles, data and a small script are inline. It shows,
for each text segment (e.g. one per domain):

* a grid, MoE layers x tokens, each cell coloured by the token's top expert in that layer and
  labelled with its number (hover for all of the token's experts and weights);
* the text itself with every token coloured by its top expert in one layer, chosen with a
  slider (the script recolours it; without scripts the first MoE layer is shown).

Everything the page shows is rendered on the server side as well, so it reads in any browser;
the script only adds the layer slider and fills ``#status`` (``data-rendered="yes"`` on
``<body>``), which ``scripts/check_routing_html.py`` uses to prove a real browser ran it.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.io import atomic_write_text
from .stats import token_assignments

#: 20 distinguishable colours (Tableau 20 order), then HSL steps for more experts.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


def expert_color(expert: int) -> str:
    if expert < len(PALETTE):
        return PALETTE[expert]
    return f"hsl({(expert * 137) % 360}, 55%, 60%)"


def _text_color(color: str) -> str:
    if not color.startswith("#"):
        return "#000"
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


@dataclass
class TokenRouting:
    """One text's routing, ready to display.

    Attributes:
        label: segment heading (e.g. the domain).
        tokens: display string of each token (T,).
        layers: decoder layer index of each MoE layer shown (L,).
        assignments: [layer][token] -> (expert, weight) pairs, highest weight first.
    """

    label: str
    tokens: list[str]
    layers: list[int]
    assignments: list[list[list[tuple[int, float]]]]

    def __post_init__(self) -> None:
        if len(self.assignments) != len(self.layers):
            raise ValueError(f"{len(self.assignments)} assignment rows for {len(self.layers)} layers")
        for row in self.assignments:
            if len(row) != len(self.tokens):
                raise ValueError(f"an assignment row has {len(row)} tokens, the text has {len(self.tokens)}")


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (what the token spells)."""
    return [tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def capture_token_routing(model, tokenizer, text: str, *, label: str = "text", max_tokens: int = 64) -> TokenRouting:
    """Run a moeforge MoE model on the first ``max_tokens`` tokens of ``text`` and keep its routing.

    At most the model's context (:func:`~moeforge.utils.positions.model_context`) is shown: routing at
    positions the model was never trained on is not the model's behaviour.
    """
    from ..utils.positions import model_context

    context = model_context(model)
    if context is not None:
        max_tokens = min(max_tokens, context)
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    if not ids:
        raise ValueError("the text has no tokens")
    was_training = model.training
    model.eval()
    try:
        out = model(torch.tensor([ids], device=next(model.parameters()).device), output_routing=True, use_cache=False)
    finally:
        model.train(was_training)
    routing = out.routing or ()
    layers = [i for i, r in enumerate(routing) if r is not None]
    if not layers:
        raise ValueError("the model returned no routing; it has no MoE layers")
    return TokenRouting(label, token_strings(tokenizer, ids), layers, [token_assignments(routing[i]) for i in layers])


def _visible(token: str) -> str:
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def _tooltip(layer: int, token: str, pairs: list[tuple[int, float]]) -> str:
    experts = ", ".join(f"expert {e}: {w:.2f}" for e, w in pairs) or "dropped (no expert)"
    return f"layer {layer} | {token!r} | {experts}"


def _cell_style(pairs: list[tuple[int, float]]) -> str:
    if not pairs:
        return "background:#fff;color:#999"
    c = expert_color(pairs[0][0])
    return f"background:{c};color:{_text_color(c)}"


def _segment_html(k: int, seg: TokenRouting) -> str:
    esc = html.escape
    head = "".join(f'<th class="tok" title="{esc(repr(t))}">{esc(_visible(t))}</th>' for t in seg.tokens)
    rows = []
    for layer, row in zip(seg.layers, seg.assignments):
        cells = "".join(
            f'<td style="{_cell_style(p)}" title="{esc(_tooltip(layer, t, p))}">{p[0][0] if p else "&middot;"}</td>'
            for t, p in zip(seg.tokens, row)
        )
        rows.append(f'<tr><th class="layer">{layer}</th>{cells}</tr>')
    first = seg.assignments[0]
    text = "".join(
        f'<span class="t" data-i="{i}" style="{_cell_style(p)}" title="{esc(_tooltip(seg.layers[0], t, p))}">'
        f"{esc(t.replace(chr(10), chr(8629) + chr(10)))}</span>"
        for i, (t, p) in enumerate(zip(seg.tokens, first))
    )
    return (
        f'<section class="segment" id="seg{k}"><h2>{esc(seg.label)}</h2>'
        f'<p class="meta">{len(seg.tokens)} tokens &middot; {len(seg.layers)} MoE layers. '
        "Cells: the token's top expert in that layer (hover for all its experts and weights).</p>"
        f'<div class="gridwrap"><table class="grid"><thead><tr><th class="layer">layer</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        f'<div class="textview"><label>text coloured by top expert in layer '
        f'<b class="layerlabel">{seg.layers[0]}</b> '
        f'<input type="range" class="slider" min="0" max="{len(seg.layers) - 1}" value="0" data-seg="{k}"></label>'
        f'<div class="text">{text}</div></div></section>'
    )


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:18px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 4px}
.meta,#status{font-size:12px;color:#555;margin:2px 0 8px}
.legend span{display:inline-block;padding:1px 6px;margin:1px;border-radius:3px;font-size:12px}
.gridwrap{overflow-x:auto;border:1px solid #ddd;background:#fff;max-width:100%}
table.grid{border-collapse:collapse;font-size:10px;font-family:ui-monospace,Menlo,monospace}
table.grid td{width:18px;min-width:18px;height:14px;text-align:center;border:1px solid #fff;padding:0}
table.grid th.tok{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;padding:2px 0;
  max-height:90px;overflow:hidden;white-space:nowrap;border-bottom:1px solid #ccc}
table.grid th.layer{font-weight:normal;color:#555;padding:0 6px;text-align:right;position:sticky;left:0;background:#fff}
.textview{margin:8px 0 4px;background:#fff;border:1px solid #ddd;padding:8px}
.textview label{font-size:12px;color:#444}
.text{font-family:ui-monospace,Menlo,monospace;font-size:13px;white-space:pre-wrap;line-height:1.7;margin-top:6px}
.text .t{border-radius:2px;padding:0 1px;margin:0 1px 0 0}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('routing-data').textContent);
  function color(e){ return e < data.palette.length ? data.palette[e] : 'hsl(' + ((e*137)%360) + ',55%,60%)'; }
  function fg(c){ if(c[0] !== '#') return '#000'; var r=parseInt(c.substr(1,2),16), g=parseInt(c.substr(3,2),16),
    b=parseInt(c.substr(5,2),16); return (0.299*r+0.587*g+0.114*b) > 140 ? '#000' : '#fff'; }
  data.segments.forEach(function(seg, k){
    var sec = document.getElementById('seg' + k);
    var slider = sec.querySelector('.slider'), label = sec.querySelector('.layerlabel');
    var spans = sec.querySelectorAll('.text .t');
    function paint(li){
      label.textContent = seg.layers[li];
      seg.assignments[li].forEach(function(pairs, i){
        var s = spans[i];
        if(!pairs.length){ s.style.background = '#fff'; s.style.color = '#999'; }
        else { var c = color(pairs[0][0]); s.style.background = c; s.style.color = fg(c); }
        s.title = 'layer ' + seg.layers[li] + ' | ' + JSON.stringify(seg.tokens[i]) + ' | ' +
          (pairs.length ? pairs.map(function(p){ return 'expert ' + p[0] + ': ' + p[1].toFixed(2); }).join(', ')
                        : 'dropped (no expert)');
      });
    }
    slider.addEventListener('input', function(){ paint(+slider.value); });
    paint(0);
  });
  var tokens = data.segments.reduce(function(a, s){ return a + s.tokens.length; }, 0);
  document.getElementById('status').textContent = 'Rendered ' + data.segments.length + ' segment(s), ' +
    tokens + ' tokens, ' + data.num_experts + ' experts. Move a slider to recolour the text by another layer.';
  document.body.setAttribute('data-rendered', 'yes');
})();
"""


def routing_html(segments: Sequence[TokenRouting], *, title: str = "Token routing", num_experts: int | None = None) -> str:
    """The HTML page (a string) for ``segments``."""
    if not segments:
        raise ValueError("routing_html needs at least one segment")
    if num_experts is None:
        num_experts = 1 + max(e for s in segments for row in s.assignments for pairs in row for e, _ in pairs)
    legend = "".join(
        f'<span style="background:{expert_color(e)};color:{_text_color(expert_color(e))}">expert {e}</span>'
        for e in range(num_experts)
    )
    data = {
        "num_experts": num_experts,
        "palette": list(PALETTE),
        "segments": [
            {"label": s.label, "tokens": s.tokens, "layers": s.layers,
             "assignments": [[[[e, round(w, 4)] for e, w in pairs] for pairs in row] for row in s.assignments]}
            for s in segments
        ],
    }
    payload = json.dumps(data).replace("</", "<\\/")
    body = "".join(_segment_html(k, s) for k, s in enumerate(segments))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f'<body data-rendered="no"><h1>{html.escape(title)}</h1>'
        '<p id="status">Static view (scripts not run).</p>'
        f'<div class="legend">{legend}</div>{body}'
        f'<script type="application/json" id="routing-data">{payload}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_routing_html(path: str | os.PathLike, segments: Sequence[TokenRouting], **kwargs) -> Path:
    """Write :func:`routing_html` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, routing_html(segments, **kwargs))
    return path
