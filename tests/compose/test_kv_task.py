"""The synthetic key-value arithmetic data: splits, hand-checked examples, tokenizer round trip."""

import random

from moeforge.compose.kv_task import KVTable, char_tokenizer, numeric_sample


def test_key_split_and_examples():
    table = KVTable.generate(100, composition_fraction=0.2, seed=3)
    assert len(table.train_keys) == 20 and len(table.heldout_keys) == 80
    assert not set(table.train_keys) & set(table.heldout_keys)
    assert all(2 <= len(k) <= 4 and k.isalpha() for k in table.values)
    table.values.update({"ab": 12, "cde": 34, "f": 56})
    ops = ["+", "+", "-"]
    keys = ["ab", "cde", "f"]
    assert table.example("kv_substitution", keys, ops) == ("ab+cde-f:", "12+34-56")
    assert table.example("numeric_arithmetic", keys, ops) == ("12+34-56=", "-10")
    assert table.example("kv_arithmetic", keys, ops) == ("ab+cde-f=", "-10")


def test_heldout_samples_use_heldout_keys_only():
    table = KVTable.generate(50, seed=1)
    for prompt, target in table.sample("kv_arithmetic", 50, keys=table.heldout_keys, seed=2):
        names = prompt[:-1].replace("-", "+").split("+")
        assert set(names) <= set(table.heldout_keys)
        signs = [1] + [1 if c == "+" else -1 for c in prompt if c in "+-"]
        assert int(target) == sum(s * table.values[n] for s, n in zip(signs, names))


def test_numeric_sample_is_correct():
    for prompt, target in numeric_sample(50, seed=4):
        assert eval(prompt[:-1]) == int(target)  # noqa: S307 - digits and +/- only


def test_char_tokenizer_roundtrip(tmp_path):
    tok = char_tokenizer()
    text = "".join(random.Random(0).choice("abc123+-=:") for _ in range(30))
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 31
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    from moeforge import load_tokenizer  # noqa: F401  (moeforge finds it beside a checkpoint)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab() and again(text)["input_ids"] == ids


def test_chat_template_gives_the_evaluated_layout():
    """A (prompt, answer) record renders to <s> prompt answer </s>, loss on the answer and </s> only."""
    from moeforge.data.chat import tokenize_chat

    tok = char_tokenizer()
    ids, labels = tokenize_chat(tok, [{"role": "user", "content": "ab+c="}, {"role": "assistant", "content": "-10"}])
    assert ids == tok("ab+c=-10")["input_ids"] + [tok.eos_token_id]
    assert labels == [-100] * 6 + ids[6:]


def test_spaced_format_and_space_jitter():
    table = KVTable.generate(20, max_value=9, spaced=True, seed=2)
    table.values.update({"ab": 3, "cde": 5})
    assert table.example("kv_substitution", ["ab", "cde"], ["+", "-"]) == ("ab - cde :", "3 - 5")
    assert table.example("kv_arithmetic", ["ab", "cde"], ["+", "+"]) == ("ab + cde =", "8")
    assert table.lookups(["ab"]) == [("ab :", "3")]
    assert numeric_sample(1, max_value=9, spaced=True, seed=1)[0][0].count(" ") in (3, 5)  # 2 or 3 terms
    for prompt, target in numeric_sample(100, max_value=9, space_jitter=3, seed=3):
        assert eval(prompt.replace(" ", "")[:-1]) == int(target)  # noqa: S307
        assert "    " not in prompt  # at most 3 spaces in a row
