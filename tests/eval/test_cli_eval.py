"""``moeforge eval`` end to end on tiny checkpoints written to disk."""

import json
import math

import pytest

from moeforge.cli import main
from moeforge.eval.corpora import resolve_corpus, tokenize_corpus
from moeforge.eval.perplexity import perplexity

from .tiny import tiny_llama, tiny_moe, tiny_tokenizer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    tiny_moe().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_json_report_matches_the_library(moe_dir, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    code, out, _ = run(["eval", str(moe_dir), "--data", "prose", "--data", str(tmp_path / "mine.txt"),
                        "--max-tokens", "300", "--seq-len", "64", "--json"], capsys)
    assert code in (0, None)
    report = json.loads(out)
    assert set(report["perplexity"]) == {"prose", "mine"}
    # the same number straight from the library
    import moeforge

    model, tok = moeforge.load(str(moe_dir)), tiny_tokenizer()
    ids = tokenize_corpus(tok, resolve_corpus("prose"), 300)
    assert report["perplexity"]["prose"] == pytest.approx(perplexity(model, ids, seq_len=64), rel=1e-5)
    p = report["parameters"]
    assert p["total"] == sum(t.numel() for t in model.parameters())
    # 2 MoE layers, 4 experts of 3*32*16 weights, top-2: 2 experts per layer inactive per token
    assert p["total"] - p["active"] == 2 * 2 * 3 * 32 * 16
    layers = report["routing"]["layers"]
    assert [s["layer"] for s in layers] == [0, 2]
    assert all(s["tokens"] == 256 + 256 for s in layers)  # 4 windows of 64 per corpus (300 -> 256)
    assert all(math.isclose(sum(s["load_fraction"]), 1.0) for s in layers)
    assert report["flops_per_token"] > 0 and report["tokens_per_second"] > 0


def test_plots_and_html_are_written(moe_dir, tmp_path, capsys):
    code, out, _ = run(["eval", str(moe_dir), "-d", "code", "-d", "arithmetic", "--max-tokens", "128",
                        "--seq-len", "64", "--plots", str(tmp_path / "p")], capsys)
    assert code in (0, None)
    assert "routing per MoE layer" in out and "perplexity" in out
    for name in ("expert_load.png", "domain_usage.png", "routing.html"):
        f = tmp_path / "p" / name
        assert f.is_file() and f.stat().st_size > 2000, name
    assert "arithmetic" in (tmp_path / "p" / "routing.html").read_text()


def test_dense_model_has_no_routing(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "d")
    tiny_tokenizer().save_pretrained(tmp_path / "d")
    code, out, _ = run(["eval", str(tmp_path / "d"), "-d", "prose", "--max-tokens", "64", "--json"], capsys)
    report = json.loads(out)
    assert report["routing"] is None and report["parameters"]["total"] == report["parameters"]["active"]


def test_bad_corpus_is_one_line_exit_2(moe_dir, capsys):
    code, out, err = run(["eval", str(moe_dir), "--data", "wikitxt"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("moeforge: error: unknown corpus 'wikitxt'")
    assert "Traceback" not in err


def test_unwritable_plots_directory_fails_before_evaluating(moe_dir, tmp_path, capsys, monkeypatch):
    import moeforge.eval.evaluate as evaluate_mod

    def never(*a, **k):
        raise AssertionError("evaluated although --plots cannot be written")

    monkeypatch.setattr(evaluate_mod, "evaluate", never)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for plots, message in ((afile, "exists and is not a directory"), (afile / "sub", "is a file")):
        code, out, err = run(["eval", str(moe_dir), "--data", "prose", "--plots", str(plots)], capsys)
        assert code == 2 and err.startswith("moeforge: error: --plots directory") and message in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_a_plot_that_cannot_be_written_still_prints_the_report(moe_dir, tmp_path, capsys):
    plots = tmp_path / "p"
    (plots / "expert_load.png").mkdir(parents=True)  # a directory where the plot goes
    code, out, err = run(["eval", str(moe_dir), "-d", "code", "--max-tokens", "128", "--seq-len", "64",
                          "--plots", str(plots)], capsys)
    assert code == 2 and "perplexity" in out and "routing per MoE layer" in out
    last = err.strip().splitlines()[-1]  # (progress lines come first on stderr)
    assert last.startswith("moeforge: error: could not write the plots") and last.endswith("expert_load.png: Is a directory")
    assert ".expert_load.png." not in err and "Traceback" not in err
