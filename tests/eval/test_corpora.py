"""Evaluation corpora by name and path, and their errors."""

import json

import pytest

from moeforge.errors import MoeforgeError
from moeforge.eval.corpora import default_corpora, read_corpus_file, resolve_corpus, tokenize_corpus

from .tiny import tiny_tokenizer


def test_builtin_names_are_the_valid_split():
    from moeforge.data import builtin_documents

    c = resolve_corpus("arithmetic")
    assert c.name == "arithmetic" and list(c.documents) == builtin_documents("arithmetic", "valid")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(MoeforgeError, match="Did you mean 'wikitext2'.*Known corpora"):
        resolve_corpus("wikitxt2")


def test_benchmarks_come_from_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_DATA", str(tmp_path))
    assert default_corpora() == ["prose", "code", "arithmetic"]
    with pytest.raises(MoeforgeError, match="MOEFORGE_DATA"):
        resolve_corpus("wikitext2")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text(" = Title = \n\n Some text .\n")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert default_corpora() == ["prose", "code", "arithmetic", "wikitext2", "gsm8k"]
    assert resolve_corpus("WikiText-2").text == " = Title = \n\n Some text .\n"
    assert resolve_corpus("gsm8k").documents == ("1+1?\n#### 2",)


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert resolve_corpus(str(tmp_path / "a.txt")).documents == ("hello world",)
    lines = [{"text": "one"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    c = resolve_corpus(str(tmp_path / "b.jsonl"))
    assert c.name == "b" and c.documents == ("one", "q\na")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(x) for x in lines))  # JSON Lines under .json
    assert resolve_corpus(str(tmp_path / "c.json")).documents == ("one", "q\na")
    (tmp_path / "d.json").write_text(json.dumps(lines))  # one JSON document
    assert resolve_corpus(str(tmp_path / "d.json")).documents == ("one", "q\na")


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    record = json.dumps({"question": "2+2?", "answer": "4"}) + "\n"
    (tmp_path / "q.jsonl").write_bytes(b"\xef\xbb\xbf" + record.encode())  # as task files accept it
    assert read_corpus_file(tmp_path / "q.jsonl").documents == ("2+2?\n4",)
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert read_corpus_file(tmp_path / "t.txt").documents == ("hello",)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "  \n", "holds no text"),
        ("bad.jsonl", "{not json}\n", "bad.jsonl:1 is not valid JSON"),
        ("odd.jsonl", json.dumps({"body": "x"}) + "\n", "keys are \\['body'\\]"),
        ("x.csv", "a,b\n", "suffix '.csv'"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(MoeforgeError, match=message):
        read_corpus_file(path)


def test_tokenize_prefix_equals_full_tokenization_prefix():
    tok = tiny_tokenizer()
    corpus = resolve_corpus("prose")
    full = tok(corpus.text[:20000], add_special_tokens=False).input_ids
    ids = tokenize_corpus(tok, corpus, max_tokens=500)
    assert ids.tolist() == full[:500]
