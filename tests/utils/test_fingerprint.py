"""Sampled weight digests (compose's model fingerprint, PEFT's base fingerprint)."""

import torch

from moeforge.utils.fingerprint import _positions, sampled_digest


def test_positions_are_exact_for_tensors_past_float32_integer_precision():
    # SmolLM2's embedding: 49152 x 576 = 28,311,552 elements; float32 linspace gave index numel
    for numel in (1, 2, 63, 64, 65, 2**24 + 1, 28_311_552, 131_072_000):
        idx = _positions(numel, 64)
        assert idx[0] == 0 and idx[-1] == numel - 1
        assert len(idx) == min(numel, 64)
        assert bool((idx[1:] > idx[:-1]).all())


def test_digest_of_a_tensor_larger_than_2_to_the_24():
    big = torch.zeros(2**24 + 513)
    d = sampled_digest([("w", big)])
    big[-1] = 1.0  # the last element is sampled
    assert sampled_digest([("w", big)]) != d
    assert sampled_digest([("w", big.to(torch.bfloat16))]) == sampled_digest([("w", big)])
