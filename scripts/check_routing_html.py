"""Render moeforge's token-routing HTML page in headless Chromium, screenshot it, and check it.

    .venv/bin/python scripts/check_routing_html.py [--html PAGE.html] [--out DIR]

Without ``--html`` it first builds a page from a small randomly initialised moeforge MoE model
(3 MoE layers, 8 experts, top-2) over text from the built-in domains, so the check needs no data
and no trained model; pass the ``routing.html`` that ``moeforge eval MODEL --plots DIR`` wrote to
check a real one. Chromium comes from Debian (``apt-get install -y chromium``).

Checks, each failing with a non-zero exit:
1. the browser ran the page's script (``data-rendered="yes"`` in the DOM it dumps);
2. the screenshot is a PNG of the requested size that is not blank and shows at least three of
   the expert colours of the legend (the grid and text were painted).
Prints the screenshot's path; look at it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTH, HEIGHT = 1280, 1000


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found; install Debian's package: apt-get install -y chromium")


def demo_page(path: Path) -> Path:
    """A routing page from a random tiny MoE model and a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moeforge.analysis.html import capture_token_routing, write_routing_html
    from moeforge.data import builtin_text
    from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM

    texts = {d: builtin_text(d, "valid") for d in ("prose", "code", "arithmetic")}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t[:30000] for t in texts.values()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    torch.manual_seed(0)
    cfg = MoeforgeConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         moe={"num_experts": 8, "top_k": 2, "expert_size": 16}, moe_layers=[0, 1, 3])
    model = MoeforgeForCausalLM(cfg).eval()
    segments = [capture_token_routing(model, tok, text, label=name, max_tokens=40) for name, text in texts.items()]
    return write_routing_html(path, segments, title="Token routing: random tiny MoE (browser check)", num_experts=8)


def run_chromium(chromium: str, page: Path, screenshot: Path) -> str:
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--disable-dev-shm-usage", "--no-first-run", f"--window-size={WIDTH},{HEIGHT}"]
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        extra = [f"--user-data-dir={profile}", "--virtual-time-budget=3000"]
        dom = subprocess.run(common + extra + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
        if dom.returncode != 0:
            raise SystemExit(f"chromium --dump-dom failed ({dom.returncode}): {dom.stderr[-2000:]}")
        shot = subprocess.run(common + extra + [f"--screenshot={screenshot}", url],
                              capture_output=True, text=True, timeout=120)
        if shot.returncode != 0 or not screenshot.is_file():
            raise SystemExit(f"chromium --screenshot failed ({shot.returncode}): {shot.stderr[-2000:]}")
    return dom.stdout


def check_screenshot(path: Path) -> dict:
    import matplotlib.image as mpimg
    import numpy as np

    from moeforge.analysis.html import PALETTE

    img = mpimg.imread(str(path))[..., :3]
    h, w = img.shape[:2]
    if (w, h) != (WIDTH, HEIGHT):
        raise SystemExit(f"screenshot is {w}x{h}, expected {WIDTH}x{HEIGHT}")
    pixels = (img.reshape(-1, 3) * 255).round().astype(np.int16)
    if pixels.std(axis=0).max() < 5:
        raise SystemExit("screenshot is blank (one flat colour)")
    seen = []
    for k, colour in enumerate(PALETTE[:8]):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
        count = int((np.abs(pixels - rgb).max(axis=1) <= 3).sum())
        if count >= 50:
            seen.append((k, count))
    if len(seen) < 3:
        raise SystemExit(f"only {len(seen)} expert colours visible in the screenshot ({seen}); the grid did not paint")
    return {"size": (w, h), "expert_colours_seen": len(seen), "pixels_per_colour": dict(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, help="an existing routing.html (default: build a demo page)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "browser_check", help="where the page and PNG go")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.html or demo_page(args.out / "routing_demo.html")
    chromium = find_chromium()
    screenshot = args.out / (page.stem + ".png")
    dom = run_chromium(chromium, page, screenshot)
    if 'data-rendered="yes"' not in dom or "Rendered " not in dom:
        raise SystemExit("the page's script did not run in Chromium (no data-rendered=\"yes\" in the DOM)")
    result = check_screenshot(screenshot)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"OK: {page} rendered in {version}; script ran; {result['expert_colours_seen']} expert colours painted")
    print(f"screenshot: {screenshot}")


if __name__ == "__main__":
    main()
