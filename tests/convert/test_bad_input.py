"""Bad input: one clear MoeforgeError each, non-zero CLI exit, and no output directory left behind."""

import json
import shutil

import pytest
import torch

import moeforge
from moeforge.cli import main
from moeforge.errors import MoeforgeError


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def convert_fails(source, tmp_path, match, **options):
    out = tmp_path / "out"
    before = leftovers(tmp_path)
    with pytest.raises(MoeforgeError, match=match):
        moeforge.convert(source, out, eval_tokens=0, **options)
    assert leftovers(tmp_path) == before  # no half-written directory, no temp directory
    return out


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(str(tmp_path / "gpt2"))
    convert_fails(tmp_path / "gpt2", tmp_path, r"unsupported architecture 'gpt2'.*llama, mistral, qwen2")


def test_moe_model_is_refused_as_already_moe(tiny_llama, tmp_path):
    moeforge.convert(tiny_llama, tmp_path / "moe", experts=2, top_k=1, eval_tokens=0)
    convert_fails(tmp_path / "moe", tmp_path, "already a Mixture-of-Experts")


def test_experts_not_dividing_the_ffn(tiny_llama, tmp_path):
    convert_fails(tiny_llama, tmp_path, r"--experts 5 \+ --shared-experts 0 = 5 does not divide the FFN width 64.*2, 4, 8",
                  experts=5, top_k=1)


def test_top_k_above_experts():
    with pytest.raises(MoeforgeError, match="--top-k 9 is greater than --experts 8"):
        moeforge.convert("unused", None, experts=8, top_k=9)


def test_unknown_options_and_names():
    with pytest.raises(MoeforgeError, match="unknown method 'clusters'.*Did you mean 'cluster'"):
        moeforge.ConvertConfig(method="clusters")
    with pytest.raises(MoeforgeError, match="unknown conversion option 'expert'.*experts"):
        moeforge.convert("unused", None, expert=4)
    with pytest.raises(MoeforgeError, match="unknown rescale"):
        moeforge.ConvertConfig(rescale="sometimes")
    with pytest.raises(MoeforgeError, match="copies of each other"):
        moeforge.ConvertConfig(method="upcycle", gate_init="centroid")
    with pytest.raises(MoeforgeError, match="--layers names layer 7"):
        moeforge.ConvertConfig(layers="7").check_against(2, 64)


def test_existing_output_directory_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MoeforgeError, match="already exists.*--overwrite"):
        moeforge.convert(tiny_llama, out, experts=2, top_k=1, eval_tokens=0)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces earlier conversions only, never a folder of something else
    with pytest.raises(MoeforgeError, match="not a moeforge conversion.*refusing"):
        moeforge.convert(tiny_llama, out, experts=2, top_k=1, eval_tokens=0, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    done = tmp_path / "done"
    moeforge.convert(tiny_llama, done, experts=2, top_k=1, eval_tokens=0)
    (done / "stale.txt").write_text("old run")
    moeforge.convert(tiny_llama, done, experts=4, top_k=1, eval_tokens=0, overwrite=True)
    assert not (done / "stale.txt").exists() and (done / "config.json").is_file()


def test_overwrite_never_deletes_the_input_model(tiny_llama, tmp_path):
    source = tmp_path / "models" / "dense"
    shutil.copytree(tiny_llama, source)
    for out in (source, source.parent):
        with pytest.raises(MoeforgeError, match="holds the input model"):
            moeforge.convert(source, out, experts=2, top_k=1, eval_tokens=0, overwrite=True)
    assert (source / "config.json").is_file()


def test_failed_conversion_leaves_no_parent_folders(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(MoeforgeError):
        moeforge.convert(broken, tmp_path / "new" / "deep" / "out", experts=2, top_k=1, eval_tokens=0)
    assert not (tmp_path / "new").exists()


def test_output_gets_the_usual_permissions(tiny_llama, tmp_path):
    # not mkdtemp's / mkstemp's private 0700 / 0600: an export is shared with teammates and servers
    from moeforge.utils import io

    out = tmp_path / "perm"
    moeforge.convert(tiny_llama, out, experts=2, top_k=1, eval_tokens=0)
    assert out.stat().st_mode & 0o777 == 0o777 & ~io._UMASK
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~io._UMASK, f.name


def test_truncated_safetensors(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    convert_fails(broken, tmp_path, "truncated")


def test_corrupted_safetensors_header(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[8:12] = b"@@@@"
    (broken / "model.safetensors").write_bytes(bytes(data))
    convert_fails(broken, tmp_path, "not a readable safetensors file")


def test_pickle_only_checkpoint_needs_opt_in(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    pk = tmp_path / "pickle"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    _save_pickle(model, pk)
    shutil.copy(tiny_llama / "tokenizer.json", pk)
    convert_fails(pk, tmp_path, "only pickle weights.*--allow-pickle")
    report = moeforge.convert(pk, tmp_path / "ok", allow_pickle=True, experts=2, top_k=1, eval_tokens=0)
    assert report.format == "mixtral"


def _save_pickle(model, path):
    path.mkdir()
    model.config.save_pretrained(str(path))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_unsupported_gguf(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_tensor("dummy", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    convert_fails(path, tmp_path, r"architecture 'phi2'.*supported GGUF architectures: llama, mistral, qwen2")


def test_format_that_cannot_hold_the_model(tiny_llama, tmp_path):
    convert_fails(tiny_llama, tmp_path, "--format mixtral cannot hold this model exactly: Mixtral has no shared experts",
                  experts=3, shared_experts=1, top_k=1, format="mixtral")


def test_cli_error_is_one_line_and_exit_2(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), "--out", str(tmp_path / "o"), "--experts", "3", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge: error: --experts 3") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_success_prints_summary(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), "--out", str(tmp_path / "o"), "--experts", "4", "--top-k", "2",
              "--eval-tokens", "256", "--quiet"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "format mixtral" in out and "active parameters / token" in out and "perplexity" in out
    assert json.loads((tmp_path / "o" / "moeforge_conversion.json").read_text())["format"] == "mixtral"


def test_cli_verify_modes(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), "--out", str(tmp_path / "bad"), "--experts", "4", "--verify", "sometimes",
              "--quiet"])
    assert exc.value.code == 2
    assert "verify must be one of auto (True), full, layers or off" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    for mode, checked in (("off", False), ("layers", True), ("full", True)):
        with pytest.raises(SystemExit) as exc:
            main(["convert", str(tiny_llama), "--out", str(tmp_path / mode), "--experts", "4", "--verify", mode,
                  "--eval-tokens", "0", "--quiet"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert ("verified" in out) == checked, out
        assert ("(first 1 layer(s) only)" in out) == (mode == "layers"), out


def test_empty_output_path_is_refused(tiny_llama):
    # '' would otherwise resolve to the current directory
    with pytest.raises(MoeforgeError, match="output directory is empty"):
        moeforge.convert(tiny_llama, "", experts=2, top_k=1, eval_tokens=0)


def test_option_types_are_accepted_or_refused_clearly(tiny_llama, tmp_path):
    from moeforge.convert.config import ConvertConfig

    assert ConvertConfig(layers=1).layers == [1]
    assert ConvertConfig(dtype="bf16").dtype == "bfloat16" and ConvertConfig(dtype=torch.float16).dtype == "float16"
    with pytest.raises(MoeforgeError, match="layers must be a list of layer indices"):
        ConvertConfig(layers=["a"])
    with pytest.raises(MoeforgeError, match="router_options must be a mapping"):
        ConvertConfig(router_options="x")
    with pytest.raises(MoeforgeError, match="normalize_weights must be true or false"):
        ConvertConfig(normalize_weights="no")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MoeforgeError, match="exists and is not a directory"):
        moeforge.convert(tiny_llama, afile, experts=2, top_k=1, eval_tokens=0)


def test_out_of_range_numbers_are_refused_up_front():
    C = moeforge.ConvertConfig
    for kw, match in [
        (dict(rescale=float("inf")), "--rescale must be a positive number"),
        (dict(rescale="inf"), "--rescale must be a positive number"),
        (dict(method="upcycle", upcycle_noise=float("inf")), "upcycle_noise must be a finite number"),
        (dict(seed=10**23), r"seed must be an integer in \[0, 2\^63\)"),
        (dict(layers="0-100000000"), "spans more than 100,000 layers"),
        (dict(router="expert_choice", top_k=100, experts=4), "expert choice routing does not use k"),
        (dict(router="expert_choice", rescale="fit"), "--rescale fit fit.* expert choice routes across a batch"),
        (dict(router="expert_choice", gate_init="activation", refine="down"), "--gate-init activation, --refine down"),
    ]:
        with pytest.raises(MoeforgeError, match=match):
            C(**kw)
    with pytest.raises(MoeforgeError, match="must be 0 .* or at least 2"):
        moeforge.convert("unused", None, eval_tokens=1)


def test_expert_choice_auto_rescale_uses_the_capacity_factor(tiny_llama):
    # each expert takes c * T / E tokens, so a token reaches c experts on average: auto rescale is E / c
    default = moeforge.convert(tiny_llama, None, router="expert_choice", experts=4, top_k=1, eval_tokens=0, verify="off")
    assert default.model.config.moe["output_scale"] == pytest.approx(4 / 2.0)
    wide = moeforge.convert(tiny_llama, None, router="expert_choice", experts=4, top_k=1, eval_tokens=0, verify="off",
                            router_options={"capacity_factor": 1.0})
    assert wide.model.config.moe["output_scale"] == pytest.approx(4 / 1.0)


@pytest.mark.parametrize("args, match", [(["--max-tokens", "1"], "--max-tokens must be at least 2"),
                                         (["--new-tokens", "0"], "--new-tokens must be at least 1")])
def test_demo_checks_its_numbers_before_converting(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "out"), *args])
    assert err.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_reaches_every_conversion_option(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as done:
        main(["convert", str(tiny_llama), "--out", str(out), "--experts", "4", "--top-k", "2", "--quiet", "--eval-tokens",
              "0", "--method", "cluster", "--kmeans-iters", "3", "--no-normalize-weights", "--max-shard-size", "20KB",
              "--router-option", "aux_loss_coef=0.02", "--router-option", "z_loss_coef=1e-3", "--format", "moeforge",
              "--rescale", "fit", "--calibration-tokens", "256", "--calibration-seq-len", "32", "--refine", "router",
              "--refine-steps", "2", "--refine-lr", "0.05"])
    assert done.value.code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe"]["normalize_weights"] is False and cfg["moe"]["aux_loss_coef"] == 0.02
    assert cfg["moe"]["z_loss_coef"] == 1e-3 and len(list(out.glob("*.safetensors"))) > 1
    for bad, match in [("aux_loss_coef", "is not KEY=VALUE"), ("aux_los_coef=1", "unknown MoE setting 'aux_los_coef'")]:
        with pytest.raises(SystemExit) as err:
            main(["convert", str(tiny_llama), "--out", str(tmp_path / "x"), "--quiet", "--router-option", bad])
        assert err.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_calibration_without_a_tokenizer_names_the_data_free_choices(tmp_path):
    from .tiny import make_dense

    make_dense(tmp_path / "notok", tokenizer=False)
    with pytest.raises(MoeforgeError, match="--method cluster with --shared-experts .* cluster without shared experts"):
        moeforge.convert(tmp_path / "notok", None, method="cluster", experts=3, shared_experts=1, top_k=1, eval_tokens=0)
    report = moeforge.convert(tmp_path / "notok", None, method="cluster", experts=4, top_k=2, eval_tokens=0)
    assert report.model is not None


def test_one_token_calibration_windows_are_refused():
    # a window of one token has no next-token loss: importance came out all zero and every
    # SharingInner expert got the same neurons, silently
    with pytest.raises(MoeforgeError, match="calibration_seq_len .* at least 2"):
        moeforge.ConvertConfig(method="importance", calibration_seq_len=1)
    moeforge.ConvertConfig(method="importance", calibration_seq_len=2)


def test_max_shard_size_is_read_and_checked_up_front():
    """A plain byte count (what the error message offers) was refused, '0KB' / '-5KB' were accepted
    (a shard per tensor), 'infGB' raised OverflowError, and a bad size was only noticed when the
    first shard was opened, after calibration."""
    from moeforge.convert.streaming import parse_size

    assert parse_size("500000") == 500_000 and parse_size(" 2 GB ") == 2 * 10**9
    assert moeforge.ConvertConfig(max_shard_size="500000").max_shard_size == "500000"
    for bad in ("lots", "0KB", "-5KB", "0", "infGB", "nanMB"):
        with pytest.raises(MoeforgeError, match="max_shard_size|cannot read size"):
            moeforge.ConvertConfig(max_shard_size=bad)


def test_options_no_step_reads_are_refused():
    """--upcycle-noise with a split method, --refine-lr without a gradient refinement and
    --calibration with a data-free recipe were accepted and silently had no effect."""
    C = moeforge.ConvertConfig
    for kw, match in [
        (dict(method="cluster", upcycle_noise=0.1), "--method cluster splits the FFN .* would ignore them"),
        (dict(method="random", upcycle_reinit=0.5), "--method random splits the FFN"),
        (dict(refine_lr=0.01), "with --refine none no optimiser runs"),
        (dict(method="coactivation", refine="down", refine_lr=0.01), "with --refine down no optimiser runs"),
        (dict(method="random", calibration="code"), "--calibration is not read"),
        (dict(method="cluster", gate_init="centroid", calibration="prose"), "--calibration is not read"),
        (dict(method="random", refine_steps=50), "--refine-steps .* with --refine none none run"),
        (dict(method="coactivation", refine="down", refine_steps=50), "with --refine down none run"),
        (dict(method="upcycle", granularity=4), "--granularity .* --method upcycle does not read it"),
        (dict(method="importance", kmeans_iters=5), "--method importance runs no k-means"),
    ]:
        with pytest.raises(MoeforgeError, match=match):
            C(**kw)
    C(method="upcycle", upcycle_noise=0.1, upcycle_reinit=0.5)
    assert (C().refine_steps, C().granularity, C().kmeans_iters) == (200, 2, 20)  # the defaults, filled in
    assert C(method="granular-upcycle", experts=8, granularity=4).granularity == 4
    assert C(method="cluster", kmeans_iters=3, refine="all", refine_steps=7).kmeans_iters == 3
    C(method="granular-upcycle", experts=4, upcycle_noise=0.1)
    C(method="coactivation", refine="router", refine_lr=0.01, calibration="code")
    C(method="random", rescale="fit", calibration="prose")
    C(method="cluster", shared_experts=1, experts=3, calibration="prose")


def test_cli_conversion_killed_with_sigterm_leaves_nothing(tiny_llama, tmp_path):
    """SIGTERM (kill, timeout, a job scheduler) ended the process on the spot and left the
    half-written temporary directory beside --out; it now cleans up as Ctrl-C does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, signal, sys\n"
        "import moeforge.convert.api as api\n"
        "from moeforge.cli import main\n"
        "api._write_generation_config = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
        "main(sys.argv[1:])\n"
    )
    parent = tmp_path / "runs"
    parent.mkdir()
    root = str(Path(moeforge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, "convert", str(tiny_llama), "--out", str(parent / "moe"),
                           "--experts", "2", "--top-k", "1", "--quiet", "--eval-tokens", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "moeforge: error: interrupted" in done.stderr and "Traceback" not in done.stderr
    assert leftovers(parent) == []


def test_export_options_of_an_in_memory_conversion_are_refused(tiny_llama):
    """out=None converts in memory: format= and overwrite= were accepted and silently ignored."""
    with pytest.raises(MoeforgeError, match="format='mixtral' applies to a written export, but out=None"):
        moeforge.convert(tiny_llama, None, experts=2, top_k=1, format="mixtral", eval_tokens=0)
    with pytest.raises(MoeforgeError, match="overwrite=True applies to a written export"):
        moeforge.convert(tiny_llama, None, experts=2, top_k=1, overwrite=True, eval_tokens=0)
    assert moeforge.convert(tiny_llama, None, experts=2, top_k=1, eval_tokens=0).model is not None
