"""`moeforge train` with a `compose:` section trains the connections only and saves them alone."""

import json

import pytest
import torch
import yaml

from moeforge.cli import main
from moeforge.compose import load_composition
from moeforge.compose.kv_task import KVTable


def _config(saved_models, tmp_path, **compose):
    table = KVTable.generate(40, seed=0)
    data = tmp_path / "kv.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in table.sample("kv_arithmetic", 64, keys=table.train_keys)))
    config = {
        "model": str(saved_models["anchor"]),
        "output_dir": str(tmp_path / "run"),
        "data": [{"name": "kv", "path": str(data), "prompt_field": "prompt", "response_field": "answer"}],
        "steps": 3, "batch_size": 8, "seq_len": 24, "lr": 1e-2, "warmup_steps": 0,
        "progress": False, "plots": False, "device": "cpu",
        "compose": {"augmenting": str(saved_models["augmenting"]), "num_connections": 2, **compose},
    }
    path = tmp_path / "calm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_moeforge_train_trains_a_composition(saved_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", str(_config(saved_models, tmp_path))])
    assert done.value.code in (0, None)
    final = tmp_path / "run" / "final"
    files = {p.name for p in final.iterdir()}
    assert {"composition.json", "composition.safetensors"} <= files
    assert not any(f.startswith("model") for f in files)  # the frozen models are not copied
    composed = load_composition(final)
    assert composed.sources["anchor"] == str(saved_models["anchor"].resolve())
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(composed(ids).logits, composed.anchor(ids).logits)  # the connections trained
    # the anchor on disk is untouched
    from moeforge import load

    with torch.no_grad():
        assert torch.equal(load(saved_models["anchor"])(ids).logits, composed.anchor(ids).logits)


def test_bad_compose_section_exits_with_one_line(saved_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", str(_config(saved_models, tmp_path, num_connections=9))])
    assert done.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moeforge: error:")]
    assert len(errors) == 1 and "num_connections=9 is more than the 2 layers of the augmenting model" in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "section, message",
    [
        ({"init_from": 5}, "compose.init_from must be a path or alias (a string), got 5 (int)"),
        ({"init_from": "x", "allow_other_models": "false"},
         "compose.allow_other_models must be true or false, got 'false' (str)"),
    ],
)
def test_wrongly_typed_section_keys_exit_with_one_line(saved_models, tmp_path, capsys, section, message):
    """init_from: 5 ended in a TypeError traceback; allow_other_models: "false" (quoted) counted as true."""
    with pytest.raises(SystemExit) as done:
        main(["train", str(_config(saved_models, tmp_path, **section))])
    assert done.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moeforge: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err


def test_seq_len_past_the_augmenting_models_context_refused(saved_models, tmp_path, capsys):
    """Only the anchor's context was checked: m_A ran past its own max_position_embeddings silently."""
    from moeforge.models import MoeforgeConfig

    cfg = MoeforgeConfig.from_pretrained(saved_models["augmenting"])
    cfg.max_position_embeddings = 16
    cfg.save_pretrained(saved_models["augmenting"])
    with pytest.raises(SystemExit) as done:
        main(["train", str(_config(saved_models, tmp_path))])  # seq_len 24
    assert done.value.code == 2
    assert "seq_len=24 is longer than the augmenting model's context of 16 positions" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
