"""Streaming conversion at LLaMA-2-7B scale: wall time, peak RSS and throughput vs a plain copy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert.py               # 8 layers (the default)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert.py --layers 32   # the whole 7B shape (27 GB of disk)

Builds a float16 checkpoint with LLaMA-2-7B's shapes (hidden 4096, FFN 11008, 32 heads, vocab
32000, untied head) and random weights, ``--layers`` layers deep, in 2 GB shards; then, side by
side on the same files:

* plain copy: every shard read and written (64 MB chunks, fsync), the floor for any converter;
* tensor copy: every tensor read with moeforge's reader and written with its writer, unchanged;
* ``moeforge.convert`` with each ``--methods`` entry (8 experts, top-2, Mixtral export, export
  verification on), in a fresh process whose RSS is sampled every 5 ms.

Reported per run: wall time of the streaming phase and of the verification, throughput (dense
checkpoint bytes / streaming seconds) and its ratio to the plain copy, and peak RSS above the
process's RSS after imports, as a multiple of the largest layer (405 MB in float16).
Goals (issue 3): peak RSS below 3x the largest layer; ``random`` at least half the plain-copy
throughput; ``cluster`` within 5 minutes for 32 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from _args import positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)

HIDDEN, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000


def layer_bytes(dtype_bytes: int = 2) -> int:
    return dtype_bytes * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)


def build_checkpoint(path: Path, layers: int) -> int:
    """Write a random float16 LLaMA-2-7B-shaped checkpoint; return its size in bytes."""
    from transformers import LlamaConfig

    from moeforge.convert.streaming import PlanEntry, ShardedWriter

    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.save_pretrained(str(path))
    f16 = torch.float16
    plan = [PlanEntry("model.embed_tokens.weight", (VOCAB, HIDDEN), f16)]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [PlanEntry(p + "input_layernorm.weight", (HIDDEN,), f16)]
        plan += [PlanEntry(p + f"self_attn.{x}_proj.weight", (HIDDEN, HIDDEN), f16) for x in "qkvo"]
        plan += [PlanEntry(p + "post_attention_layernorm.weight", (HIDDEN,), f16)]
        plan += [PlanEntry(p + "mlp.gate_proj.weight", (FFN, HIDDEN), f16), PlanEntry(p + "mlp.up_proj.weight", (FFN, HIDDEN), f16),
                 PlanEntry(p + "mlp.down_proj.weight", (HIDDEN, FFN), f16)]
    plan += [PlanEntry("model.norm.weight", (HIDDEN,), f16), PlanEntry("lm_head.weight", (VOCAB, HIDDEN), f16)]
    writer = ShardedWriter(path, plan, max_shard_bytes=2 * 10**9)
    g = torch.Generator().manual_seed(0)
    for e in plan:
        if e.key.endswith("norm.weight"):
            t = torch.ones(e.shape, dtype=f16)
        else:
            t = torch.empty(e.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(f16)
        writer.write(e.key, t)
        del t
    writer.close()
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def plain_copy(src: Path, dst: Path) -> float:
    """Copy every shard with 64 MB reads and writes, fsync'd; return seconds."""
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as r, open(dst / f.name, "wb") as w:
            shutil.copyfileobj(r, w, 64 << 20)
            w.flush()
            os.fsync(w.fileno())
    return time.perf_counter() - t0


def tensor_copy(src: Path, dst: Path) -> float:
    """Read every tensor with moeforge's reader and write it unchanged with its writer; return seconds."""
    from moeforge.convert.streaming import PlanEntry, SafetensorsReader, ShardedWriter
    from moeforge.utils.io import safetensors_files

    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reader = SafetensorsReader(safetensors_files(src))
    keys = sorted(reader.keys(), key=lambda k: (reader.info(k).path.name, reader.info(k).offset))
    plan = [PlanEntry(k, reader.info(k).shape, reader.info(k).dtype) for k in keys]
    writer = ShardedWriter(dst, plan, max_shard_bytes=2 * 10**9)
    for k in keys:
        writer.write(k, reader.get(k))
    writer.close()
    reader.close()
    return time.perf_counter() - t0


CHILD = textwrap.dedent(
    """
    import json, sys, threading, time, psutil, torch
    SRC, OUT, METHOD, REPO = sys.argv[1:5]
    sys.path.insert(0, REPO)
    import moeforge
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = {"stream": base, "verify": base}
    phase = ["stream"]
    marks = {}
    done = threading.Event()
    def sample():
        while not done.is_set():
            rss = proc.memory_info().rss
            peak[phase[0]] = max(peak[phase[0]], rss)
            time.sleep(0.005)
    def progress(message):
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)
        if message.startswith("verifying"):
            marks["stream_end"] = time.perf_counter()
            marks["stream_cpu"] = sum(proc.cpu_times()[:2]) - cpu0
            phase[0] = "verify"
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    cpu0 = sum(proc.cpu_times()[:2])
    report = moeforge.convert(SRC, OUT, method=METHOD, experts=8, top_k=2, eval_tokens=0, progress=progress)
    end = time.perf_counter()
    done.set(); t.join()
    print(json.dumps({"base_rss": base, "peak_stream": peak["stream"], "peak_verify": peak["verify"],
                      "stream_seconds": marks.get("stream_end", end) - t0, "total_seconds": end - t0,
                      "stream_cpu_seconds": marks.get("stream_cpu"),
                      "verification": report.verification, "format": report.format}))
    """
)


def run_convert(src: Path, out: Path, method: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), method, str(REPO)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"conversion with {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ram_gib() -> float:
    """This machine's physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=positive_int, default=8, help="decoder layers of the synthetic checkpoint (LLaMA-2-7B has 32)")
    ap.add_argument("--methods", default="random,cluster")
    ap.add_argument("--workdir", default="/tmp/moeforge-bench-convert")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / f"llama2-7b-shape-{args.layers}l"
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        size = build_checkpoint(src, args.layers)
        print(f"built {src} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s", flush=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = []
    copy_s = plain_copy(src, work / "plain-copy")
    shutil.rmtree(work / "plain-copy")
    rows.append(("plain copy (64 MB reads/writes, fsync)", copy_s, None, None))
    tcopy_s = tensor_copy(src, work / "tensor-copy")
    shutil.rmtree(work / "tensor-copy")
    rows.append(("tensor copy (moeforge reader + writer)", tcopy_s, None, None))
    results = {}
    for method in args.methods.split(","):
        out = work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_convert(src, out, method)
        results[method] = r
        rows.append((f"convert --method {method} (8 experts, top-2, Mixtral)", r["stream_seconds"], r, method))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(method, json.dumps(r), flush=True)
    largest = layer_bytes()
    lines = [
        f"Synthetic float16 checkpoint with LLaMA-2-7B shapes, {args.layers} of 32 layers"
        f"{' (all)' if args.layers == 32 else ''}: {size / 1e9:.2f} GB; largest layer {largest / 1e6:.0f} MB.",
        "",
        "| run | wall s (streaming) | CPU s (streaming) | throughput GB/s | vs plain copy | verify s | peak RSS above start (stream / verify) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seconds, r, method in rows:
        thr = size / seconds / 1e9
        ratio = copy_s / seconds
        if r is None:
            lines.append(f"| {name} | {seconds:.1f} | - | {thr:.2f} | {ratio:.2f} | - | - |")
        else:
            ps = (r["peak_stream"] - r["base_rss"]) / 1e6
            pv = (r["peak_verify"] - r["base_rss"]) / 1e6
            lines.append(
                f"| {name} | {seconds:.1f} | {r['stream_cpu_seconds']:.1f} | {thr:.2f} | {ratio:.2f} | "
                f"{r['total_seconds'] - seconds:.1f} | "
                f"{ps:.0f} MB ({ps * 1e6 / largest:.2f} x layer) / {pv:.0f} MB ({pv * 1e6 / largest:.2f} x layer) |"
            )
    if "cluster" in results and "random" in results and args.layers < 32:
        # cluster = random's streaming + k-means per layer; scale each part to 32 layers
        extra = (results["cluster"]["stream_seconds"] - results["random"]["stream_seconds"]) / args.layers
        stream32 = results["random"]["stream_seconds"] * (32 * layer_bytes() + 4 * VOCAB * HIDDEN) / size
        lines += ["", f"cluster extrapolated to 32 layers: about {(stream32 + 32 * extra) / 60:.1f} min "
                      f"(random's streaming scaled by bytes, {stream32:.0f} s, plus the measured k-means overhead "
                      f"of {extra:.1f} s per layer)."]
    text = "\n".join(lines)
    print(text)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    if not args.no_report:
        from moeforge.eval.report import device_description, update_section

        update_section(
            "convert-benchmark",
            f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert.py --layers {args.layers}`. "
            f"Device: {device_description()}, {_ram_gib():.0f} GiB RAM, shared with other jobs (times are indicative).\n\n" + text,
            title="Streaming conversion at LLaMA-2-7B scale",
        )


if __name__ == "__main__":
    main()
