"""The composed model end to end: equals the anchor when fresh, causal, cache == no cache, trains only itself."""

import pytest
import torch

from moeforge.compose import compose
from moeforge.compose import layers as layers_mod
from moeforge.compose import model as model_mod
from moeforge.errors import MoeforgeError

from .conftest import llama, moe, randomize_outputs


@pytest.mark.parametrize("roles", ["llama<-moe", "moe<-llama"])
def test_fresh_composition_gives_anchor_logits_exactly(roles):
    anchor, augmenting = (llama(), moe()) if roles == "llama<-moe" else (moe(hidden=48, layers=3), llama())
    composed = compose(anchor, augmenting, num_connections=2)
    ids = torch.randint(3, 40, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.equal(composed(ids, attention_mask=mask).logits, anchor(ids, attention_mask=mask).logits)
        # trained connections change the output; hooks are gone afterwards
        randomize_outputs(composed)
        assert not torch.allclose(composed(ids).logits, anchor(ids).logits)
        plain = anchor(ids).logits
    for model in (anchor, augmenting):
        for layer in model_mod.decoder_layers(model):
            assert not layer._forward_hooks
    assert torch.equal(anchor(ids).logits.detach(), plain)


def test_connections_at_every_n_over_k_th_layer(anchor, augmenting):
    composed = compose(anchor, augmenting, num_connections=2)
    assert composed.layer_pairs == [(0, 1), (1, 3)]
    # n (D_A D_B + 4 D_B^2) plus the two RMSNorm scales per connection
    assert composed.num_composition_parameters() == 2 * (32 * 64 + 4 * 64 * 64 + 32 + 64)
    assert composed.connections[0].attn.num_heads == anchor.config.num_attention_heads


def _augmenting_only_change(composed, ids, token):
    """Change the augmenting model's embedding of ``token`` only: its states move, the anchor's inputs do not."""
    emb = composed.augmenting.get_input_embeddings().weight
    with torch.no_grad():
        emb[token] += 1.0


def test_later_augmenting_states_do_not_reach_earlier_anchor_positions(anchor, augmenting):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    t, late = 5, 40
    ids = torch.randint(3, 30, (2, 10))
    ids[:, t + 1 :] = late  # token `late` appears only after position t
    with torch.no_grad():
        before = composed(ids).logits
        _augmenting_only_change(composed, ids, late)
        after = composed(ids).logits
    # not bit-equal: when the later tokens route to other experts, each expert's matmul gets another
    # number of rows, and the BLAS kernel picked for that shape may round the earlier rows differently
    # (~1e-7 on AVX2); a leak moves them by orders of magnitude more (test_a_leaky_mask_would_be_caught)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_a_leaky_mask_would_be_caught(anchor, augmenting, monkeypatch):
    """The causality test above fails for the public implementations' unmasked cross-attention."""
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    monkeypatch.setattr(model_mod, "cross_attention_mask", lambda q, k, pad=None: torch.ones(1, 1, q, k, dtype=torch.bool))
    t, late = 5, 40
    ids = torch.randint(3, 30, (1, 10))
    ids[:, t + 1 :] = late
    with torch.no_grad():
        before = composed(ids).logits
        _augmenting_only_change(composed, ids, late)
        after = composed(ids).logits
    assert not torch.allclose(before[:, : t + 1], after[:, : t + 1])
    assert layers_mod.cross_attention_mask is not model_mod.cross_attention_mask


def test_changing_later_tokens_leaves_earlier_logits(anchor, augmenting):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    ids = torch.randint(3, 40, (2, 12))
    other = ids.clone()
    other[:, 7:] = torch.randint(3, 40, (2, 5))
    with torch.no_grad():
        a, b = composed(ids).logits, composed(other).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)


def test_cached_steps_equal_full_forward(anchor, augmenting):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        full = composed(ids).logits
        cache = composed.new_cache()
        parts = [composed(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        for i in range(5, 9):
            parts.append(composed(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    # m_A was refreshed at every step: the connection caches hold every position
    assert cache.get_seq_length() == 9 and cache.augmenting.get_seq_length() == 9
    assert all(k.shape[2] == 9 for k in cache.keys)


@pytest.mark.parametrize("roles", ["llama<-moe", "moe<-llama"])
def test_cached_generation_equals_uncached(roles):
    anchor, augmenting = (llama(), moe()) if roles == "llama<-moe" else (moe(hidden=48, layers=3), llama())
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2), std=0.5)
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, :4] = 0
    cached = composed.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    uncached = composed.generate(ids, mask, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert cached.shape == (3, 14)
    assert torch.equal(cached, uncached)
    # the composition matters for what is generated
    assert not torch.equal(cached, anchor.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0))
    # a left-padded row generates what it generates alone
    alone = composed.generate(ids[2:, 4:], max_new_tokens=8, eos_token_id=[])
    assert torch.equal(alone[0, 2:], cached[2, 6:])


def test_fresh_composition_generates_like_the_anchor(anchor, augmenting):
    composed = compose(anchor, augmenting, num_connections=1)
    ids = torch.randint(3, 40, (2, 5))
    ours = composed.generate(ids, max_new_tokens=8, eos_token_id=[])
    theirs = anchor.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_generation_stops_at_eos_and_pads(anchor, augmenting):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    ids = torch.randint(3, 40, (2, 4))
    first = composed.generate(ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    out = composed.generate(ids, max_new_tokens=5, eos_token_id=int(first[0]), pad_token_id=0)
    assert out[0, 4] == first[0] and (out[0, 5:] == 0).all()


def test_sampling_is_seeded(anchor, augmenting):
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    ids = torch.randint(3, 40, (2, 4))
    runs = [composed.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, eos_token_id=[],
                              generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)


def test_top_k_zero_samples_from_every_token(anchor, augmenting):
    """top_k=0 means no top-k filter (transformers' meaning); it raised a RuntimeError from masked_fill."""
    composed = randomize_outputs(compose(anchor, augmenting, num_connections=2))
    ids = torch.randint(3, 40, (2, 4))
    runs = [composed.generate(ids, max_new_tokens=4, do_sample=True, top_k=k, eos_token_id=[],
                              generator=torch.Generator().manual_seed(3)) for k in (0, None)]
    assert torch.equal(*runs)
    with pytest.raises(MoeforgeError, match="top_k must be >= 0"):
        composed.generate(ids, max_new_tokens=1, do_sample=True, top_k=-1)


def test_only_composition_parameters_train(anchor, augmenting):
    composed = compose(anchor, augmenting, num_connections=2)
    trainable = {n for n, p in composed.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connections.") for n in trainable)
    composed.train()
    assert composed.training and not composed.anchor.training and not composed.augmenting.training
    ids = torch.randint(3, 40, (4, 10))
    opt = torch.optim.AdamW(composed.composition_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = composed(ids, labels=ids, attention_mask=torch.ones_like(ids))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in composed.anchor.parameters())
    assert all(p.grad is None for p in composed.augmenting.parameters())
    # the output projections received gradient and moved away from zero
    assert all(c.attn.o_proj.weight.abs().sum() > 0 for c in composed.connections)


def test_moe_anchor_routing_passes_through_without_aux_loss():
    composed = compose(moe(hidden=48, layers=3), llama(), num_connections=1)
    out = composed(torch.randint(3, 40, (1, 5)), output_routing=True)
    assert len(out.routing) == 3 and out.routing[0].num_tokens == 5
    assert getattr(out, "aux_loss", None) is None
    # a LLaMA anchor has no routing to give
    assert compose(llama(), moe(), num_connections=1)(torch.randint(3, 40, (1, 5)), output_routing=True).routing is None
