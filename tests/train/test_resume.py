"""Resuming: SIGKILL after a checkpoint, NaN loss, a full disk while saving, a checkpoint from another model."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moeforge.errors import MoeforgeError
from moeforge.train import read_metrics, train
from moeforge.train.checkpoint import list_checkpoints, load_checkpoint

from .tiny import save_tiny, tiny_model

REPO = Path(__file__).resolve().parents[2]
# noisy top-k routing and expert dropout make every step draw random numbers: resuming must restore the RNG
NOISY = {"num_experts": 4, "top_k": 2, "expert_size": 16, "router": "noisy_topk", "expert_dropout": 0.1}

KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from moeforge.train import train

class KillAfterSave:
    def on_save(self, trainer, step, path):
        if step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

train(sys.argv[1], callbacks=[KillAfterSave()])
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if r["kind"] == "train"]


def test_sigkill_after_checkpoint_then_rerun_equals_uninterrupted(tmp_path, make_cfg, tokenizer):
    model_dir = save_tiny(tmp_path / "noisy", tokenizer, moe=NOISY)
    cfg = make_cfg(model=str(model_dir), steps=6, mixture={"type": "dynamic", "update_every": 2, "eval_tokens": 128})
    full = train({**cfg, "output_dir": str(tmp_path / "full")})

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "killed")}))
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg_file), "4"], env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [2, 4]
    assert not (tmp_path / "killed" / "final").exists()

    # rerun the same command: it resumes at step 4 and finishes
    rerun = subprocess.run([sys.executable, "-m", "moeforge", "train", str(cfg_file)], env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = _losses(tmp_path / "killed")
    expected = _losses(full.output_dir)
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(resumed, expected):
        assert a == pytest.approx(b, abs=1e-6)
    def weights(out):
        return [w for r in read_metrics(out) if r["kind"] == "train" for w in r["weights"].values()]

    assert weights(tmp_path / "killed") == pytest.approx(weights(full.output_dir), abs=1e-9)
    assert len(set(weights(full.output_dir))) > 2  # the dynamic mixture did move the weights
    # and so are the trained weights
    a = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1][1], 0)["model"]
    b = load_checkpoint(list_checkpoints(full.output_dir)[-1][1], 0)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, make_cfg, tokenizer):
    model = tiny_model(len(tokenizer))

    class Poison:
        def on_step_end(self, trainer, step, stats):
            if step == 3:
                with torch.no_grad():
                    trainer.model.model.embed_tokens.weight[:] = float("nan")

    with pytest.raises(MoeforgeError, match=r"NaN or infinite at step 4.*step-000002 is kept.*resumes") as err:
        train(make_cfg(steps=6), model=model, tokenizer=tokenizer, callbacks=[Poison()])
    assert "Lower lr" in str(err.value)
    out = Path(make_cfg()["output_dir"])
    assert [s for s, _ in list_checkpoints(out)] == [2]
    saved = load_checkpoint(list_checkpoints(out)[0][1], 0)["model"]
    assert all(torch.isfinite(t).all() for t in saved.values())
    # the same command resumes from the good checkpoint and finishes
    res = train(make_cfg(steps=6), model=tiny_model(len(tokenizer)), tokenizer=tokenizer)
    assert res.resumed_from == 2 and res.steps == 6 and all(torch.isfinite(torch.tensor(l)) for _, l in _losses(out))


def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path, make_cfg, monkeypatch):
    # a full disk as safetensors reports it (its own SafetensorError, not an OSError)
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing(tensors, path, metadata=None):
        if Path(path).name == "trainable.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint (step 4)
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    cfg = make_cfg(steps=6)
    with pytest.raises(MoeforgeError, match=r"No space left on device.*step-000002 is intact"):
        train(cfg)
    out = Path(cfg["output_dir"])
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no partial directory
    assert load_checkpoint(out / "checkpoints" / "step-000002", 0)["state"]["step"] == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    res = train(cfg)
    assert res.resumed_from == 2 and res.steps == 6


def test_checkpoint_from_a_different_model_is_refused(tmp_path, make_cfg, tokenizer):
    import shutil

    own = save_tiny(tmp_path / "own", tokenizer)
    train(make_cfg(steps=2, model=str(own)))
    wider = save_tiny(tmp_path / "wider", tokenizer, hidden=48)
    with pytest.raises(MoeforgeError, match=r"different config: model '.*own' -> '.*wider'"):
        train(make_cfg(steps=4, model=str(wider)))
    # another model at the same path: caught by the model fingerprint
    shutil.rmtree(own)
    shutil.copytree(wider, own)
    with pytest.raises(MoeforgeError, match="written for a different model.*parameter names/shapes"):
        train(make_cfg(steps=4, model=str(own)))
    # same architecture, other frozen weights: caught by the frozen-value digest
    base = save_tiny(tmp_path / "base", tokenizer)
    train(make_cfg(steps=2, train_params="router", model=str(base), output_dir=str(tmp_path / "r")))
    shutil.rmtree(base)
    save_tiny(base, tokenizer, seed=9)
    with pytest.raises(MoeforgeError, match="frozen weights have different values"):
        train(make_cfg(steps=4, train_params="router", model=str(base), output_dir=str(tmp_path / "r")))
    with pytest.raises(MoeforgeError, match="resume is off"):
        train(make_cfg(steps=4, model=str(base), train_params="router", output_dir=str(tmp_path / "r"), resume=False))


def test_same_shapes_other_model_config_is_refused(tmp_path, make_cfg, tokenizer):
    """A model converted again at the same path with top-1 routing has the same parameters as the
    top-2 one: the run resumed, training the checkpoint's weights under another routing."""
    import shutil

    model = save_tiny(tmp_path / "model", tokenizer)
    train(make_cfg(steps=2, model=str(model)))
    shutil.rmtree(model)
    save_tiny(model, tokenizer, moe={"num_experts": 4, "top_k": 1, "expert_size": 16})
    with pytest.raises(MoeforgeError, match=r"written for a different model \(its config differs: moe.top_k 2 -> 1\)"):
        train(make_cfg(steps=4, model=str(model)))
    # a checkpoint written before the model's config was recorded still resumes
    state_file = list_checkpoints(make_cfg()["output_dir"])[-1][1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["config"]
    state_file.write_text(json.dumps(state))
    assert train(make_cfg(steps=4, model=str(model))).resumed_from == 2


def test_stale_temporary_checkpoint_is_ignored(tmp_path, make_cfg):
    cfg = make_cfg(steps=2)
    train(cfg)
    out = Path(cfg["output_dir"])
    stale = out / "checkpoints" / ".step-000004.tmp"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    res = train({**cfg, "steps": 4})
    assert res.resumed_from == 2 and res.steps == 4
    assert not stale.exists()
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4


def test_micro_batch_size_change_is_refused_for_moe_models(tmp_path, make_cfg):
    # the routers' aux losses, Switch capacity and expert choice are per micro-batch
    from moeforge.train.trainer import config_changes

    train(make_cfg(steps=2, batch_size=4, micro_batch_size=2))
    with pytest.raises(MoeforgeError, match=r"micro_batch_size 2 -> 4"):
        train(make_cfg(steps=4, batch_size=4, micro_batch_size=4))
    old, new = {"micro_batch_size": 2, "lr": 1e-3}, {"micro_batch_size": 4, "lr": 1e-3}
    assert config_changes(old, new) == []  # a dense model: accumulation gives the same gradient
    assert config_changes(old, new, moe=True) == ["micro_batch_size 2 -> 4"]


def test_training_data_edited_in_place_is_refused_on_resume(tmp_path, make_cfg):
    """Only the block counts were compared: an edit that kept the number of blocks resumed silently
    on different data (and a resume never re-tokenises unchanged data: the cache keeps its digest)."""
    corpus = tmp_path / "notes.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    data = [{"name": "notes", "path": str(corpus), "valid_fraction": 0.1}]
    train(make_cfg(steps=2, data=data))
    train(make_cfg(steps=3, data=data))  # the same file: resumes
    corpus.write_text("the quick brown cat jumps over the lazy dog. " * 80)  # same size, other tokens
    with pytest.raises(MoeforgeError, match=r"training data of 'notes' differs from what checkpoint step-"):
        train(make_cfg(steps=4, data=data))


@pytest.mark.parametrize("state", ["[1, 2]", "{\"step\": 2}", "not json"])
def test_damaged_checkpoint_state_is_one_clear_message(tmp_path, make_cfg, state):
    from moeforge.train.checkpoint import list_checkpoints

    cfg = make_cfg(steps=2, save_every=2)
    train(cfg)
    (list_checkpoints(cfg["output_dir"])[-1][1] / "state.json").write_text(state)
    with pytest.raises(MoeforgeError, match="is damaged .*delete it to resume from an earlier one"):
        train(make_cfg(steps=4, save_every=2))


def test_full_disk_while_saving_the_final_model_is_one_clear_message(tmp_path, make_cfg, monkeypatch):
    """transformers' save_pretrained reports a full disk as safetensors' own SafetensorError, which
    escaped the final save as a traceback; the checkpoint is kept and a rerun writes final/."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    real = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    cfg = make_cfg(steps=2)
    with pytest.raises(MoeforgeError, match=r"could not write the final model .*No space left on device.*checkpoint is intact"):
        train(cfg)
    out = Path(cfg["output_dir"])
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not (out / "final").exists() and not list(out.glob(".final*"))  # nothing half-written
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    res = train(cfg)
    assert res.resumed_from == 2 and (out / "final" / "config.json").is_file()


def test_leftovers_of_a_final_save_killed_midway_are_removed_by_the_rerun(tmp_path, make_cfg):
    """SIGKILL while final/ was written left its temporary folder (a whole model) in output_dir for good."""
    import shutil

    cfg = make_cfg(steps=2)
    train(cfg)
    out = Path(cfg["output_dir"])
    shutil.rmtree(out / "final")  # as after a kill: final/ not renamed into place yet...
    (out / ".final.tmp-k1ll3d").mkdir()  # ...its half-written folder...
    (out / ".final.tmp-k1ll3d" / "model.safetensors").write_bytes(b"partial")
    (out / ".final.old-4242").mkdir()  # ...or the replaced one, not yet deleted
    res = train(cfg)
    assert res.resumed_from == 2 and (out / "final" / "config.json").is_file()
    assert not list(out.glob(".final*"))
