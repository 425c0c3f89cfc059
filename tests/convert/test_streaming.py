"""The streaming safetensors reader and planned writer against the safetensors library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeforge.convert.streaming import PlanEntry, SafetensorsReader, ShardedWriter, parse_size, read_header
from moeforge.errors import MoeforgeError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randn(4, 4, generator=g).to(torch.float16),
        "d": torch.zeros(0, 3),
        "e": torch.arange(10, dtype=torch.int64),
    }


def test_writer_shards_and_round_trip(tmp_path):
    tensors = _tensors()
    plan = [PlanEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=64)
    for k, v in tensors.items():
        writer.write(k, v)
    paths = writer.close()
    assert len(paths) > 1  # 64-byte shards force several files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    loaded = {}
    for p in paths:  # the reference library reads every shard
        loaded.update(load_file(str(p)))
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert writer.verify_digests() == len(tensors)


def test_reader_matches_safetensors_library(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with SafetensorsReader([tmp_path / "x.safetensors"]) as reader:
        assert reader.keys() == set(tensors)
        for k, v in tensors.items():
            got = reader.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v)


def test_writer_refuses_out_of_plan_order_and_shape(tmp_path):
    plan = [PlanEntry("a", (2,), torch.float32), PlanEntry("b", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="incomplete"):
        writer.close()
    writer.abort()


def test_truncated_file_is_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeforgeError, match="truncated"):
        read_header(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MoeforgeError, match="not a readable safetensors"):
        read_header(tmp_path / "m.safetensors")


def test_digest_check_catches_a_changed_byte(tmp_path):
    plan = [PlanEntry("w", (16,), torch.float32)]
    writer = ShardedWriter(tmp_path, plan)
    writer.write("w", torch.arange(16.0))
    (path,) = writer.close()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(MoeforgeError, match="differ from what was written"):
        writer.verify_digests()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(123) == 123
    with pytest.raises(MoeforgeError, match="cannot read size"):
        parse_size("lots")
