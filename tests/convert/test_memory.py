"""Streaming conversion of a multi-shard checkpoint keeps peak memory near one layer (measured)."""

import json
import subprocess
import sys
import textwrap

from .tiny import make_dense

HIDDEN, INTER, LAYERS = 256, 1024, 8
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def test_multi_shard_conversion_peak_memory_is_bounded(tmp_path):
    src = tmp_path / "dense"
    make_dense(src, hidden=HIDDEN, intermediate=INTER, layers=LAYERS, tied=False, max_shard_size="4MB", tokenizer=False)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 4
    model_bytes = sum(p.stat().st_size for p in shards)
    # measured in a fresh process: RSS sampled every millisecond while converting, minus the RSS
    # after a warm-up conversion of a tiny model (imports, allocator pools, code paths)
    code = textwrap.dedent(
        f"""
        import json, sys, threading, time, psutil, torch
        sys.path.insert(0, {str(tmp_path.parent)!r})
        torch.set_num_threads(1)
        import moeforge
        from tests.convert.tiny import make_dense
        make_dense({str(tmp_path / "warm")!r}, tokenizer=False)
        moeforge.convert({str(tmp_path / "warm")!r}, {str(tmp_path / "warm-out")!r}, experts=4, top_k=2,
                         eval_tokens=0, verify="layers")
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = {{"stream": base, "all": base}}
        phase = ["stream"]
        done = threading.Event()
        def sample():
            while not done.is_set():
                rss = proc.memory_info().rss
                peak[phase[0]] = max(peak[phase[0]], rss)
                peak["all"] = max(peak["all"], rss)
                time.sleep(0.001)
        def progress(message):
            if message.startswith("verifying"):
                phase[0] = "all"
        t = threading.Thread(target=sample); t.start()
        report = moeforge.convert({str(src)!r}, {str(tmp_path / "out")!r}, experts=8, top_k=2, eval_tokens=0,
                                  verify="layers", max_shard_size="4MB", progress=progress)
        done.set(); t.join()
        print(json.dumps({{"stream": peak["stream"] - base, "all": peak["all"] - base,
                          "layers_verified": report.verification["layers_compared"],
                          "shards": len(list(__import__("pathlib").Path({str(tmp_path / "out")!r}).glob("*.safetensors")))}}))
        """
    )
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    import os
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-c", code.replace(repr(str(tmp_path.parent)), repr(str(repo)))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    layer_bytes = 4 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 2 + 3 * HIDDEN * INTER)  # float32 attention + FFN
    vocab_bytes = 4 * 260 * HIDDEN  # one of embed_tokens / lm_head
    assert result["shards"] > 4 and result["layers_verified"] == 1
    # the whole model is 8 layers (32 MB); converting holds at most a few layers
    assert result["stream"] < 3 * layer_bytes, (result, layer_bytes, model_bytes)
    # verification adds the first layer and the embeddings twice: the reference and the reloaded export
    assert result["all"] < 3 * layer_bytes + 2 * (layer_bytes + 2 * vocab_bytes), (result, layer_bytes)
    assert result["all"] < model_bytes / 2
