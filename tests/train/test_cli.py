"""``moeforge train``: one-line errors with exit status 2, overrides reach the run, help lists the keys."""

import re

import pytest
import yaml

from moeforge.cli import main
from moeforge.train import read_metrics


def _write(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lrr", "1"], "unknown config key 'lrr'. Did you mean 'lr'?"),
        (["--data.arith.weight", "-2"], "weight -2.0; weights must be finite and >= 0"),
        (["--data.arith.weight", "0", "--data.prose.weight", "0"], "weights sum to 0"),
        (["--tokenizer", "no/such/tokenizer"], "the config's tokenizer: model 'no/such/tokenizer' not found"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, make_cfg, capsys, extra, message):
    with pytest.raises(SystemExit) as err:
        main(["train", _write(tmp_path, make_cfg()), *extra])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert stderr.count("\n") == 1


def test_cli_runs_with_overrides(tmp_path, make_cfg, capsys):
    out = tmp_path / "cli-out"
    with pytest.raises(SystemExit) as err:
        main(["train", _write(tmp_path, make_cfg(steps=50)), "--steps", "2", f"--output_dir={out}", "--data.prose.weight", "0",
              "--eval_tasks.tasks", "[arithmetic-choice]", "--eval_tasks.limit", "2"])
    assert err.value.code == 0
    recs = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["weights"] == {"prose": 0.0, "arith": 1.0} and set(r["domain_loss"]) == {"arith"} for r in recs)
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed
    assert re.search(r"task accuracy: arithmetic-choice \d+\.\d% \(\d/2\)", printed)
    assert (out / "final" / "config.json").is_file()


def test_cli_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("mixture.reference_model", "distill.teacher", "train_params", "data[].prompt_field"):
        assert key in text


def test_cli_empty_config_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SystemExit) as err:
        main(["train", str(empty)])
    assert err.value.code == 2
    assert f"config file {empty} is empty" in capsys.readouterr().err


def test_cli_errors_are_printed_once_under_torchrun(tmp_path, make_cfg, capsys, monkeypatch):
    # every torchrun process meets the same config error: only rank 0 prints it, all exit 2
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as err:
            main(["train", _write(tmp_path, make_cfg()), "--lrr", "1"])
        assert err.value.code == 2
        assert ("unknown config key 'lrr'" in capsys.readouterr().err) is printed



def test_a_warmup_longer_than_the_run_is_pointed_out(tmp_path, make_cfg, capsys):
    # --steps cut for a quick run under a config's warmup_steps: lr never reaches its value
    with pytest.raises(SystemExit) as err:
        main(["train", _write(tmp_path, make_cfg(steps=2, warmup_steps=8, progress=True, lr=1e-3))])
    assert err.value.code == 0
    out = capsys.readouterr()
    assert "note: warmup_steps 8 > steps 2: the learning rate peaks at 0.00025 (lr 0.001 x 2/8)" in out.out + out.err
    lrs = [r["lr"] for r in read_metrics(tmp_path / "out") if r.get("kind") == "train"]
    assert max(lrs) == pytest.approx(2.5e-4)
