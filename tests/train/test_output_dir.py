"""output_dir life cycle: nothing is deleted or written until the whole run has been checked, a
resumed run must be the same run, and unusable directories get one clear message."""

from pathlib import Path

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.train import train
from moeforge.train.checkpoint import list_checkpoints
from moeforge.train.trainer import CONFIG_FILE, config_changes


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_config_mistakes_never_cost_an_existing_run(tmp_path, make_cfg):
    cfg = make_cfg(steps=2)
    train(cfg)
    out = Path(cfg["output_dir"])
    before = _snapshot(out)
    missing = [{"name": "prose", "path": str(tmp_path / "nope.txt")}]
    # --overwrite with a config that fails later (data, model): the old run is still all there
    with pytest.raises(MoeforgeError, match="does not exist"):
        train(make_cfg(steps=2, overwrite=True, data=missing))
    with pytest.raises(MoeforgeError):
        train(make_cfg(steps=2, overwrite=True, model=str(tmp_path / "no-model")))
    # a refused resume leaves train_config.yaml, metrics and checkpoints as they were
    with pytest.raises(MoeforgeError, match=r"different config: batch_size 4 -> 8.*--overwrite true"):
        train(make_cfg(steps=4, batch_size=8))
    assert _snapshot(out) == before
    # and --overwrite with a good config does start over
    res = train(make_cfg(steps=2, batch_size=8, overwrite=True))
    assert res.resumed_from is None and "batch_size: 8" in (out / CONFIG_FILE).read_text()


def test_failed_fresh_run_leaves_no_output_dir(tmp_path, make_cfg):
    out = tmp_path / "fresh" / "run"
    with pytest.raises(MoeforgeError, match="does not exist"):
        train(make_cfg(output_dir=str(out), data=[{"name": "x", "path": str(tmp_path / "nope.txt")}]))
    assert not (tmp_path / "fresh").exists()


def test_unusable_output_dir(tmp_path, make_cfg):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MoeforgeError, match="exists and is not a directory"):
        train(make_cfg(output_dir=str(afile)))
    with pytest.raises(MoeforgeError, match="cannot be created: .* is a file"):
        train(make_cfg(output_dir=str(afile / "sub")))


def test_steps_on_resume(tmp_path, make_cfg):
    cfg = make_cfg(steps=4, save_every=2)
    train(cfg)
    with pytest.raises(MoeforgeError, match="at step 4, past steps=2; pass --steps 4 or more"):
        train(make_cfg(steps=2, save_every=2))
    longer = train(make_cfg(steps=6, save_every=2, keep_last=3))  # more steps (and other bookkeeping) may change
    assert longer.resumed_from == 4 and longer.steps == 6
    again = train(make_cfg(steps=6, save_every=2, keep_last=3))
    assert again.resumed_from == 6 and again.steps == 6
    assert [s for s, _ in list_checkpoints(cfg["output_dir"])] == [2, 4, 6]


def test_finished_run_whose_checkpoints_were_deleted_is_not_silently_retrained(make_cfg):
    """Its checkpoints deleted to free disk, a finished run rerun with another lr started over in
    place: its metrics went at once and its final/ model was replaced, without --overwrite."""
    import shutil

    cfg = make_cfg(steps=2)
    train(cfg)
    out = Path(cfg["output_dir"])
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    with pytest.raises(MoeforgeError, match=r"holds a finished run's model \(final/\) but no checkpoint.*--overwrite true"):
        train(make_cfg(steps=2, lr=1e-3))
    assert _snapshot(out) == before
    res = train(make_cfg(steps=2, lr=1e-3, overwrite=True))
    assert res.resumed_from is None and "lr: 0.001" in (out / CONFIG_FILE).read_text()


def test_extended_run_interrupted_before_its_final_save_does_not_keep_the_old_final(tmp_path, make_cfg):
    """A finished 2-step run extended to 4 steps and stopped between its last checkpoint and its
    final save: the rerun took the 2-step run's final/ for its own and reported the stale model."""
    import moeforge
    from moeforge.train.checkpoint import load_checkpoint

    train(make_cfg(steps=2))

    class StopInFinalEval:
        def on_eval(self, trainer, record):
            if record.get("final"):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(steps=4), callbacks=[StopInFinalEval()])
    out = Path(make_cfg()["output_dir"])
    assert [s for s, _ in list_checkpoints(out)][-1] == 4
    res = train(make_cfg(steps=4))
    assert res.resumed_from == 4 and res.final_dir == out / "final"
    saved = load_checkpoint(list_checkpoints(out)[-1][1], 0)["model"]
    final = moeforge.load(out / "final").state_dict()
    for key, value in saved.items():
        assert torch.equal(final[key], value), key


def test_seq_len_longer_than_the_model_context(make_cfg):
    with pytest.raises(MoeforgeError, match="seq_len=512 is longer than the model's context of 256"):
        train(make_cfg(seq_len=512))


def test_config_changes_lists_what_would_splice_two_runs():
    old = {"lr": 1e-3, "steps": 10, "progress": True, "mixture": {"type": "static", "eta": 1.0},
           "data": [{"name": "prose", "weight": 0.5}, {"name": "code", "weight": 0.5}]}
    same = {**old, "steps": 20, "progress": False}
    assert config_changes(old, same) == []
    new = {**old, "lr": 2e-3, "mixture": {"type": "static", "eta": 2.0},
           "data": [{"name": "prose", "weight": 0.7}, {"name": "code", "weight": 0.5}]}
    assert config_changes(old, new) == ["data.prose.weight 0.5 -> 0.7", "lr 0.001 -> 0.002", "mixture.eta 1.0 -> 2.0"]
    dropped = {**old, "data": [{"name": "prose", "weight": 0.5}]}
    assert config_changes(old, dropped) == ["data (sources) ['prose', 'code'] -> ['prose']"]
    # a source swapped for another is that one line, not every field of both sources
    swapped = {**old, "data": [{"name": "prose", "weight": 0.5}, {"name": "web", "path": "web.jsonl", "weight": 0.5}]}
    assert config_changes(old, swapped) == ["data (sources) ['prose', 'code'] -> ['prose', 'web']"]


def test_api_arguments_in_the_wrong_form(tmp_path, make_cfg, tiny_dir, tokenizer):
    from .tiny import tiny_model

    with pytest.raises(MoeforgeError, match=r"train\(model=...\) takes a loaded model object, got a str"):
        train(make_cfg(steps=1), model=str(tiny_dir))
    with pytest.raises(MoeforgeError, match="only a label .* pass tokenizer="):
        train(make_cfg(steps=1, model="my-run"), model=tiny_model(len(tokenizer)))

    class Count:
        steps = 0

        def on_step_end(self, trainer, step, stats):
            Count.steps += 1

    # one callback object instead of a list; a tokenizer given by path
    res = train(make_cfg(steps=2, model="my-run", output_dir=str(tmp_path / "cb")), model=tiny_model(len(tokenizer)),
                tokenizer=str(tiny_dir), callbacks=Count())
    assert res.steps == 2 and Count.steps == 2


def test_rerunning_a_finished_run_does_not_evaluate_again(make_cfg, monkeypatch):
    from moeforge.train.trainer import Trainer

    first = train(make_cfg(steps=2))
    monkeypatch.setattr(Trainer, "evaluate", lambda *a, **k: pytest.fail("evaluated a finished run again"))
    again = train(make_cfg(steps=2))
    assert again.resumed_from == 2 and again.eval_losses == first.eval_losses


class _Interrupt:
    """Ctrl-C during the first step."""

    def on_step_end(self, trainer, step, stats):
        raise KeyboardInterrupt


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, make_cfg):
    cfg = make_cfg(steps=2)
    train(cfg)
    out = Path(cfg["output_dir"])
    before = _snapshot(out)
    # fails after output_dir was claimed: a dynamic mixture's reference model loads when training starts
    reference = {"type": "dynamic", "update_every": 1, "eval_tokens": 64, "reference_model": str(tmp_path / "nope")}
    with pytest.raises(MoeforgeError, match="not found"):
        train(make_cfg(steps=2, overwrite=True, mixture=reference))
    assert _snapshot(out) == before
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(steps=4, save_every=4, overwrite=True), callbacks=[_Interrupt()])
    assert _snapshot(out) == before and not list(tmp_path.glob(".out.replaced-*"))
    # a fresh run interrupted before its first checkpoint leaves nothing behind
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(steps=4, save_every=4, output_dir=str(tmp_path / "fresh")), callbacks=[_Interrupt()])
    assert not (tmp_path / "fresh").exists()
    # once the new run has a checkpoint, the old one is gone
    res = train(make_cfg(steps=2, lr=1e-3, overwrite=True))
    assert res.resumed_from is None and "lr: 0.001" in (out / CONFIG_FILE).read_text()
    assert not list(tmp_path.glob(".out.replaced-*"))


def test_output_dir_holding_other_files_or_the_model_is_refused(tmp_path, make_cfg, tiny_dir):
    import shutil

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(MoeforgeError, match="holds other files and is not a moeforge training directory"):
            train(make_cfg(output_dir=str(other), overwrite=overwrite))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    model = tmp_path / "run" / "final"
    shutil.copytree(tiny_dir, model)
    with pytest.raises(MoeforgeError, match="the model .* lies inside output_dir"):
        train(make_cfg(model=str(model), output_dir=str(tmp_path / "run"), overwrite=True))
    assert (model / "config.json").is_file()
    with pytest.raises(MoeforgeError, match="output_dir is empty"):
        train(make_cfg(output_dir=""))
    with pytest.raises(MoeforgeError, match="cache_dir is empty .* 'off' to disable"):
        train(make_cfg(output_dir=str(tmp_path / "cached"), cache_dir=" "))
    assert not (tmp_path / "cached").exists()
    with pytest.raises(MoeforgeError, match="'output_dir' expects a string, got nothing"):
        train(make_cfg(output_dir=None))
