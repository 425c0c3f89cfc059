"""TrainConfig: shipped configs load, overrides, unknown keys with the closest valid key, bad values."""

import re
from pathlib import Path

import pytest

from moeforge.errors import MoeforgeError
from moeforge.train.config import TrainConfig, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
BASE = {"model": "m", "output_dir": "o", "data": [{"name": "prose", "builtin": "prose"}, {"name": "code", "builtin": "code", "weight": 3}]}


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpt_smollm2_moe.yaml", "sft_gsm8k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.steps > 0 and cfg.data
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip


def test_cpt_and_sft_configs_content():
    cpt = load_config(CONFIGS[0].parent / "cpt_smollm2_moe.yaml")
    assert [d.builtin for d in cpt.data] == ["prose", "code", "arithmetic"]
    assert cpt.mixture.type == "dynamic" and cpt.mixture.reference_model == "smollm2"
    sft = load_config(CONFIGS[0].parent / "sft_gsm8k.yaml")
    assert (sft.data[0].prompt_field, sft.data[0].response_field) == ("question", "answer")


def test_overrides_cli_form_and_dict_form():
    cfg = load_config(BASE, ["--lr", "1e-4", "--mixture.type=dynamic", "--data.code.weight", "0.5", "--betas", "[0.8, 0.9]", "--micro-batch-size", "2"])
    assert cfg.lr == 1e-4 and cfg.mixture.type == "dynamic" and cfg.data[1].weight == 0.5
    assert cfg.betas == [0.8, 0.9] and cfg.micro_batch_size == 2
    assert cfg.weights == pytest.approx([1 / 1.5, 0.5 / 1.5])
    cfg = load_config(BASE, {"steps": "20", "data.0.weight": 2, "distill.teacher": "smollm2"})
    assert cfg.steps == 20 and cfg.data[0].weight == 2.0 and cfg.distill.teacher == "smollm2"
    assert parse_overrides(["--resume", "false", "--x=null"]) == [("resume", False), ("x", None)]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--lrr", "1"], r"unknown config key 'lrr'\. Did you mean 'lr'\?"),
        (["--mixture.etaa", "1"], r"unknown config key 'mixture\.etaa'\. Did you mean 'mixture\.eta'\?"),
        (["--data.code.wieght", "1"], r"unknown config key 'data\.code\.wieght'\. Did you mean 'data\.code\.weight'\?"),
        # nothing close: the section's keys, or at the top level where to find them all
        (["--data.code.extra", "1"], r"unknown config key 'data\.code\.extra'\. Keys under data\.code: builtin, format, .*weight\."),
        (["--distill.bogus", "1"], r"unknown config key 'distill\.bogus'\. Keys under distill: teacher, temperature, weight\."),
        (["--foo", "1"], r"unknown config key 'foo'\. `moeforge train --help` lists the config keys\."),
        (["--data.cdoe.weight", "1"], r"no data source named 'cdoe'\. Did you mean 'code'\?"),
        (["--data.5.weight", "1"], "out of range"),
        (["--steps"], "needs a value"),
        (["--overwrite", "--steps", "5"], r"--overwrite needs a value .*--overwrite true"),
        (["--lr", "nan"], "expects a finite number"),
        (["--output_dir", ""], "'output_dir' expects a string, got nothing"),
        (["--eps", "0"], "eps must be > 0"),
        (["steps", "3"], "unexpected argument"),
        (["--steps", "abc"], "expects an integer"),
        (["--lr", "fast"], "expects a number"),
        (["--data.code.weight", "-1"], "weights must be finite and >= 0"),
        (["--data.code.weight", "0", "--data.prose.weight", "0"], "weights sum to 0"),
        (["--mixture.type", "dynamik"], r"Did you mean 'dynamic'\?"),
        (["--train_params", "routers"], r"Did you mean 'router'\?"),
        (["--batch_size", "0"], "positive integer"),
        (["--mixture.reference_losses", "{prose: 1.0}"], r"missing \['code'\]"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(MoeforgeError, match=match):
        load_config(BASE, overrides)


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    with pytest.raises(MoeforgeError, match="not found"):
        load_config(p)
    p.write_text("model: m\noutput_dir: o\ndata: [{name: a, builtin: prose}]\nstep: 3\n")
    with pytest.raises(MoeforgeError, match=r"unknown config key 'step'\. Did you mean 'steps'\?"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(MoeforgeError, match="mapping"):
        load_config(p)
    p.write_text("model: m\noutput_dir: o\n")
    with pytest.raises(MoeforgeError, match="missing required key"):
        load_config(p)


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "at least one data source"),
        ([{"name": "a"}], "exactly one of `path`"),
        ([{"name": "a", "path": "x", "builtin": "prose"}], "exactly one of `path`"),
        ([{"name": "a", "builtin": "poetry"}], "unknown built-in domain 'poetry'"),
        ([{"name": "a", "builtin": "prose"}, {"name": "a", "builtin": "code"}], "unique; repeated: a"),
        ([{"name": "a", "path": "x", "prompt_field": "q"}], "set both prompt_field and response_field"),
        ([{"name": "a", "builtin": "prose", "weight": float("nan")}], "finite"),
        ([{"name": "/abs", "builtin": "prose"}], "without dots or slashes"),  # it names a cache folder
        ([{"name": "a/b", "builtin": "prose"}], "without dots or slashes"),
        ([{"name": "a", "path": ""}], "empty `path`"),  # would read the current directory
    ],
)
def test_bad_data_sources(data, match):
    with pytest.raises(MoeforgeError, match=match):
        TrainConfig.from_dict({"model": "m", "output_dir": "o", "data": data})


def test_cross_field_checks():
    with pytest.raises(MoeforgeError, match="at least two data domains"):
        load_config({**BASE, "data": BASE["data"][:1], "mixture": {"type": "dynamic"}})
    with pytest.raises(MoeforgeError, match="conflicts with the `peft` section"):
        load_config({**BASE, "peft": {"method": "mov"}, "train_params": "router"})
    with pytest.raises(MoeforgeError, match="not both"):
        load_config({**BASE, "peft": {}, "compose": {}})


def test_aux_loss_scales_names_are_checked():
    from moeforge.train.config import load_config

    base = {"model": "m", "output_dir": "o", "data": [{"name": "p", "builtin": "prose"}]}
    assert load_config({**base, "aux_loss_scales": {"z_loss": 0.5}}).aux_loss_scales == {"z_loss": 0.5}
    with pytest.raises(MoeforgeError, match="aux_loss_scales has no loss 'balance'.*Did you mean 'balance_loss'"):
        load_config({**base, "aux_loss_scales": {"balance": 0.0}})


def test_config_files_that_are_not_configs(tmp_path):
    from moeforge.train.config import read_yaml

    (tmp_path / "dup.yaml").write_text("model: m\nsteps: 3\noutput_dir: o\nsteps: 5\n")
    with pytest.raises(MoeforgeError, match=r"dup.yaml: config key 'steps' is set twice \(line 4\)"):
        read_yaml(tmp_path / "dup.yaml")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    with pytest.raises(MoeforgeError, match="bin.yaml is not a text file"):
        read_yaml(tmp_path / "bin.yaml")
    with pytest.raises(MoeforgeError, match="is a directory; pass the path of a YAML training config file"):
        read_yaml(tmp_path)


def test_string_overrides_keep_their_text_and_domain_names_keep_their_hyphens():
    # a string field takes the text as given: not a number, bool, mapping or YAML comment
    base = {"model": "m", "output_dir": "o", "data": [{"name": "my-code", "builtin": "code"}, {"name": "prose", "builtin": "prose"}]}
    cfg = load_config(base, ["--output_dir", "0123", "--tokenizer", "2024_01", "--separator", "[SEP]",
                             "--data.my-code.system_prompt", "Note: be brief #math", "--data.prose.text-field", "no"])
    assert (cfg.output_dir, cfg.tokenizer, cfg.separator) == ("0123", "2024_01", "[SEP]")
    assert cfg.data[0].system_prompt == "Note: be brief #math" and cfg.data[1].text_field == "no"
    # null still unsets an optional string; other types are still parsed
    cfg = load_config(base, ["--distill.teacher", "null", "--steps", "1e3", "--resume", "false", "--betas", "[0.8, 0.9]"])
    assert cfg.distill.teacher is None and cfg.steps == 1000 and cfg.resume is False and cfg.betas == [0.8, 0.9]
    # --data.NAME.key and reference_losses address a domain by its name as written (hyphens too);
    # hyphens in config field names still read as underscores
    cfg = load_config(base, ["--data.my-code.weight", "0.25", "--micro-batch-size", "2", "--mixture.type", "dynamic",
                             "--mixture.reference_losses.my-code", "2.5", "--mixture.reference_losses.prose", "3"])
    assert cfg.data[0].weight == 0.25 and cfg.micro_batch_size == 2
    assert cfg.mixture.reference_losses == {"my-code": 2.5, "prose": 3.0}


def test_peft_and_compose_overrides_keep_text_for_their_string_settings():
    """The peft:/compose: sections are free-form mappings, so `--compose.augmenting 0123` used to
    become the number 123; their string settings now keep the text, their numbers are still parsed."""
    base = {"model": "m", "output_dir": "o", "data": [{"name": "prose", "builtin": "prose"}]}
    cfg = load_config({**base, "compose": {"augmenting": "x"}},
                      ["--compose.augmenting", "0123", "--compose.init_from", "007", "--compose.num_connections", "2"])
    assert cfg.compose == {"augmenting": "0123", "init_from": "007", "num_connections": 2}
    cfg = load_config({**base, "peft": {"method": "mov"}}, ["--peft.num_experts", "4", "--peft.method", "molora"])
    assert cfg.peft == {"method": "molora", "num_experts": 4}


@pytest.mark.parametrize("section, message", [
    ({"peft": {"method": "mov", "num_expert": 4}}, "Did you mean 'num_experts'"),
    ({"peft": {"method": "lora", "num_experts": 4}}, "use MoLoRAConfig(num_experts=4)"),
    ({"compose": {"num_connections": 2}}, "the compose section needs 'augmenting'"),
    ({"compose": {"augmenting": "x", "init_from": 5}}, "compose.init_from must be a path or alias"),
])
def test_peft_and_compose_sections_are_checked_when_the_config_is_read(section, message):
    # before any model loads (the model "m" here does not even exist)
    base = {"model": "m", "output_dir": "o", "data": [{"name": "prose", "builtin": "prose"}]}
    with pytest.raises(MoeforgeError, match=re.escape(message)):
        load_config({**base, **section})


def test_an_all_digit_source_name_is_addressed_by_name():
    """`--data.2024.weight` read 2024 as a list index ("out of range") even with a source named 2024."""
    base = {"model": "m", "output_dir": "o", "data": [{"name": "2023", "builtin": "prose"}, {"name": "2024", "builtin": "code"}]}
    cfg = load_config(base, ["--data.2024.weight", "3", "--data.0.weight", "2"])
    assert [d.weight for d in cfg.data] == [2.0, 3.0]
