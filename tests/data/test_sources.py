"""Data sources, packing with separators, validation hold-out, token cache, mixture sampler."""

import json
import os

import numpy as np
import pytest
import torch

from moeforge.data.chat import IGNORE_INDEX
from moeforge.data.dataset import build_domain
from moeforge.data.packing import holdout, pack_text
from moeforge.data.sampler import MixtureSampler
from moeforge.data.sources import read_source
from moeforge.errors import MoeforgeError
from moeforge.train.config import DataSource


def test_pack_text_separators_and_padding(tokenizer):
    docs = ["1 + 1 = 2", "3 * 3 = 9", "10 - 4 = 6"]
    sep = tokenizer.eos_token_id
    blocks = pack_text(tokenizer, docs, seq_len=8, separator_id=sep)
    stream = [tokenizer(d, add_special_tokens=False)["input_ids"] + [sep] for d in docs]
    flat = [t for s in stream for t in s]
    full, rest = divmod(len(flat), 8)
    assert len(blocks) == full + (1 if rest >= 2 else 0)
    got = np.concatenate([blocks.input_ids[i, : blocks.lengths[i]] for i in range(len(blocks))]).tolist()
    assert got == flat[: len(got)] and len(got) >= len(flat) - 1
    ids, labels = blocks.batch(np.arange(len(blocks)), trim=False)
    # padding of the last block carries no loss; every real token is a target
    for i in range(len(blocks)):
        n = int(blocks.lengths[i])
        assert (labels[i, n:] == IGNORE_INDEX).all()
        assert (labels[i, :n] == ids[i, :n]).all()


def test_holdout_every_kth_block(tokenizer):
    blocks = pack_text(tokenizer, ["a b c d e f g h i j " * 40], seq_len=8, separator_id=0)
    train, valid = holdout(blocks, 0.25, "x")
    assert len(train) + len(valid) == len(blocks)
    assert np.array_equal(valid.input_ids, blocks.input_ids[3::4])
    with pytest.raises(MoeforgeError, match="too few"):
        holdout(blocks.subset(np.array([0])), 0.1, "x")


def test_text_jsonl_directory_glob(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha doc")
    (tmp_path / "d" / "b.txt").write_text("beta doc")
    (tmp_path / "d" / ".hidden").write_text("skip me")
    kind, train, valid = read_source(DataSource(name="t", path=str(tmp_path / "d")))
    assert kind == "text" and train == ["alpha doc", "beta doc"] and valid is None
    kind, train, _ = read_source(DataSource(name="t", path=str(tmp_path / "d" / "*.txt")))
    assert train == ["alpha doc", "beta doc"]
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "meta": 1}) + "\n")
    assert read_source(DataSource(name="j", path=str(j)))[:2] == ("text", ["one", "two"])
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    kind, train, _ = read_source(DataSource(name="c", path=str(c), prompt_field="question", response_field="answer"))
    assert kind == "chat" and train[0][-1] == {"role": "assistant", "content": "a"}
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert read_source(DataSource(name="m", path=str(m)))[0] == "chat"


def test_builtin_source_has_natural_valid_split():
    kind, train, valid = read_source(DataSource(name="p", builtin="prose"))
    assert kind == "text" and len(train) > len(valid) > 0
    assert set(train).isdisjoint(valid)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("   \n", "is empty"),
        ('{"text": "ok"}\nnot json\n', r"x\.jsonl:2 is not valid JSON"),
        ('{"body": "ok"}\n', "records have fields \\['body'\\] but no text_field 'text'"),
        ('[1, 2]\n', "expected an object"),
    ],
)
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "x.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(MoeforgeError, match=match):
        read_source(DataSource(name="bad", path=str(p)))


def test_bad_records_are_named_by_file_and_line(tmp_path, caplog):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(MoeforgeError, match=r"x\.jsonl:3: field 'text' is a int, not a string"):
        read_source(DataSource(name="t", path=str(p)))
    p.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(MoeforgeError, match=r"x\.jsonl:2: record has no field 'text'"):
        read_source(DataSource(name="t", path=str(p)))
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(MoeforgeError, match=r"c\.jsonl:2: conversation has no assistant message"):
        read_source(DataSource(name="c", path=str(chat)))
    # empty or null texts are skipped, but said so
    p.write_text('{"text": "fine"}\n{"text": null}\n{"text": ""}\n')
    with caplog.at_level("WARNING"):
        kind, train, _ = read_source(DataSource(name="t", path=str(p)))
    assert train == ["fine"]
    assert "skipped 2 record(s) whose 'text' field is empty or null (first: " in caplog.text and "x.jsonl:2" in caplog.text


def test_byte_order_mark_and_non_utf8_jsonl(tmp_path):
    t = tmp_path / "bom.txt"
    t.write_bytes("\ufeffHello\r\nworld\r\n".encode())
    assert read_source(DataSource(name="t", path=str(t)))[1] == ["Hello\nworld\n"]
    j = tmp_path / "bom.jsonl"
    j.write_bytes("\ufeff".encode() + b'{"text": "one"}\r\n{"text": "two"}\r\n')
    assert read_source(DataSource(name="j", path=str(j)))[1] == ["one", "two"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MoeforgeError, match=r"latin\.jsonl:2 is not UTF-8 text"):
        read_source(DataSource(name="l", path=str(latin)))


def test_json_file_holding_a_list_of_records(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"text": "first"}, {"text": "second"}], indent=2))
    assert read_source(DataSource(name="j", path=str(p)))[:2] == ("text", ["first", "second"])
    p.write_text(json.dumps({"text": "one"}, indent=2))
    assert read_source(DataSource(name="j", path=str(p)))[1] == ["one"]
    p.write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON Lines named .json
    assert read_source(DataSource(name="j", path=str(p)))[1] == ["a", "b"]


def test_builtin_with_chat_valid_path_is_refused(tmp_path):
    v = tmp_path / "v.jsonl"
    v.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(MoeforgeError, match="valid_path holds chat data"):
        read_source(DataSource(name="b", builtin="arithmetic", valid_path=str(v)))


def test_missing_directory_and_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoeforgeError, match="holds no files"):
        read_source(DataSource(name="e", path=str(tmp_path / "empty")))
    with pytest.raises(MoeforgeError, match="matches no files"):
        read_source(DataSource(name="g", path=str(tmp_path / "*.txt")))


def test_datasets_library_on_local_files(tmp_path):
    p = tmp_path / "x.parquet"
    try:
        import datasets  # noqa: F401
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(MoeforgeError, match=r"moeforge\[data\]"):
            read_source(DataSource(name="d", path=str(p)))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), p)
    assert read_source(DataSource(name="d", path=str(p)))[:2] == ("text", ["first doc", "second doc"])
    # files the library cannot read: one message naming the file and the cause, not a DatasetGenerationError
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(MoeforgeError, match=r"cannot read .*bad\.csv as csv \(UnicodeDecodeError"):
        read_source(DataSource(name="d", path=str(bad)))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(MoeforgeError, match=r"cannot read .*empty\.csv as csv \(EmptyDataError"):
        read_source(DataSource(name="d", path=str(empty)))


def test_token_cache_hit_and_invalidation(tmp_path, tokenizer):
    f = tmp_path / "doc.txt"
    f.write_text("12 + 30 = 42\n" * 200)
    src = DataSource(name="t", path=str(f), valid_fraction=0.2)
    cache = str(tmp_path / "cache")
    a = build_domain(src, tokenizer, seq_len=16, cache_dir=cache)
    b = build_domain(src, tokenizer, seq_len=16, cache_dir=cache)
    assert not a.cached and b.cached
    assert np.array_equal(a.train.input_ids, b.train.input_ids) and np.array_equal(a.valid.lengths, b.valid.lengths)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    f.write_text("7 * 6 = 42\n" * 300)  # new content: new size and mtime
    os.utime(f, ns=(1, 1))
    c = build_domain(src, tokenizer, seq_len=16, cache_dir=cache)
    assert not c.cached and not np.array_equal(c.train.input_ids[:1], a.train.input_ids[:1])
    d = build_domain(src, tokenizer, seq_len=32, cache_dir=cache)  # other seq_len: another entry
    assert not d.cached and d.train.seq_len == 32
    off = build_domain(src, tokenizer, seq_len=16, cache_dir="off")
    assert not off.cached
    # other text of the same size with the old modification time: the content hash still tells
    before = build_domain(src, tokenizer, seq_len=16, cache_dir=cache)
    stat = f.stat()
    f.write_text("6 * 7 = 42\n" * 300)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert f.stat().st_size == stat.st_size
    e = build_domain(src, tokenizer, seq_len=16, cache_dir=cache)
    assert not e.cached and not np.array_equal(e.train.input_ids, before.train.input_ids)


def test_sampler_tracks_weights_and_resumes():
    s = MixtureSampler([7, 5, 3], seed=1)
    picks = s.draw([0.5, 0.3, 0.2], 100)
    counts = np.bincount([d for d, _ in picks], minlength=3)
    assert counts.tolist() == [50, 30, 20]
    # within a domain, each epoch visits every block exactly once
    dom2 = [b for d, b in picks if d == 2]
    assert sorted(dom2[:3]) == [0, 1, 2] and sorted(dom2[3:6]) == [0, 1, 2]
    state = s.state_dict()
    ahead = s.draw([0.2, 0.2, 0.6], 17)
    t = MixtureSampler([7, 5, 3], seed=1)
    t.load_state_dict(json.loads(json.dumps(state)))
    assert t.draw([0.2, 0.2, 0.6], 17) == ahead
    zero = MixtureSampler([4, 4], seed=0).draw([1.0, 0.0], 10)
    assert all(d == 0 for d, _ in zero)
    with pytest.raises(MoeforgeError, match="blocks per domain"):
        MixtureSampler([4, 4]).load_state_dict(MixtureSampler([4, 5]).state_dict())


def test_sampler_takes_every_seed_the_config_accepts():
    """Seeds from about 9.2e12 up (e.g. a nanosecond timestamp; the config takes any seed below
    2^63) overflowed torch's generator seed at the first batch, a ValueError in mid-run."""
    big = MixtureSampler([3, 4], seed=2**63 - 1)
    picks = big.draw([0.5, 0.5], 16)
    second = [b for d, b in picks if d == 1]
    assert sorted(second[:4]) == sorted(second[4:]) == [0, 1, 2, 3]  # one permutation per epoch
    # seeds that worked before give the same order as before
    g = torch.Generator().manual_seed(5 * 1_000_003 + 1 * 7_919)
    assert [b for d, b in MixtureSampler([3, 4], seed=5).draw([0.0, 1.0], 4)] == torch.randperm(4, generator=g).tolist()


def test_damaged_cache_entry_is_rebuilt(tmp_path, tokenizer):
    f = tmp_path / "doc.txt"
    f.write_text("5 + 5 = 10\n" * 100)
    src = DataSource(name="t", path=str(f))
    cache = tmp_path / "cache"
    first = build_domain(src, tokenizer, seq_len=16, cache_dir=str(cache))
    (entry,) = list(cache.iterdir())
    (entry / "train_ids.npy").write_bytes(b"garbage")
    again = build_domain(src, tokenizer, seq_len=16, cache_dir=str(cache))
    assert not again.cached and np.array_equal(again.train.input_ids, first.train.input_ids)
    assert build_domain(src, tokenizer, seq_len=16, cache_dir=str(cache)).cached


def test_cache_entry_missing_a_file_or_with_foreign_meta_is_rebuilt(tmp_path, tokenizer):
    """An entry with valid JSON but no kind was a KeyError; one whose valid or labels file was gone
    loaded as no validation slice or as text (loss on every token), and swapped arrays went unnoticed."""
    f = tmp_path / "c.jsonl"
    conv = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
    f.write_text((json.dumps(conv) + "\n") * 30)
    src = DataSource(name="c", path=str(f), valid_fraction=0.2)
    cache = tmp_path / "cache"
    first = build_domain(src, tokenizer, seq_len=32, cache_dir=str(cache))
    (entry,) = list(cache.iterdir())
    good = {p.name: p.read_bytes() for p in entry.iterdir()}

    def damage(name, content=None):
        for n, data in good.items():
            (entry / n).write_bytes(data)
        if content is None:
            (entry / name).unlink()
        else:
            (entry / name).write_bytes(content)
        return build_domain(src, tokenizer, seq_len=32, cache_dir=str(cache))

    for name, content in [
        ("meta.json", b"{}"),
        ("meta.json", b"[]"),
        ("valid_ids.npy", None),
        ("train_labels.npy", None),
        ("train_lengths.npy", good["valid_lengths.npy"]),
    ]:
        again = damage(name, content)
        assert not again.cached, name
        assert np.array_equal(again.train.labels, first.train.labels) and len(again.valid) == len(first.valid)
    assert build_domain(src, tokenizer, seq_len=32, cache_dir=str(cache)).cached
