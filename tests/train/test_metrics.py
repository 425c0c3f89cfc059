"""The training plots drawn from metrics records (moeforge.train.metrics.write_plots)."""

from __future__ import annotations

import pytest

from moeforge.train.metrics import eval_groups, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(steps: int = 4) -> list[dict]:
    train = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s, "aux_loss": 0.01,
              "domain_loss": {"prose": 3.1 - 0.1 * s, "code": 2.9 - 0.1 * s},
              "weights": {"prose": 0.5 + 0.05 * s, "code": 0.5 - 0.05 * s},
              "expert_load": {"0": [0.5, 0.25, 0.25], "1": [0.4, 0.3, 0.3]}} for s in range(1, steps + 1)]
    evals = [{"kind": "eval", "step": steps, "loss": 2.8, "eval": {"prose": 2.9, "code": 2.7}, "final": True}]
    return train + evals


def test_every_plot_is_a_png(tmp_path):
    written = write_plots(tmp_path, _records())
    assert sorted(p.name for p in written) == ["domain_loss.png", "domain_weights.png", "expert_load.png", "loss.png"]
    for p in written:
        assert p.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files


def test_a_failed_write_keeps_the_previous_plot_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    write_plots(tmp_path, _records(2))
    before = (tmp_path / "loss.png").read_bytes()

    def full_disk(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_MAGIC)  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full_disk)
    with pytest.raises(OSError, match="loss.png"):
        write_plots(tmp_path, _records(4))
    assert (tmp_path / "loss.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domain_loss.png", "domain_weights.png", "expert_load.png",
                                                          "loss.png"]


def test_evaluations_on_different_budgets_are_separate_series():
    """A dynamic mixture's updates evaluate on mixture.eval_tokens, the regular evaluations on
    eval_tokens: one line through both zigzagged between two validation subsets."""
    evals = [{"kind": "eval", "step": s, "loss": 2.0, "eval_tokens": b} for s, b in
             [(2, 256), (4, 4096), (4, 256), (6, 256), (8, 4096)]]
    groups = eval_groups(evals)
    assert list(groups) == [4096, 256]
    assert [r["step"] for r in groups[4096]] == [4, 8] and [r["step"] for r in groups[256]] == [2, 4, 6]
    assert list(eval_groups([{"kind": "eval", "step": 1, "loss": 1.0}])) == [0]  # records from before the field
