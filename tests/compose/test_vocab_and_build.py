"""Bad input: mismatched tokenizers, missing models, bad compose sections; the trainer's entry point."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeforge.compose import compose, compose_from_config
from moeforge.compose.vocab import check_shared_vocabulary
from moeforge.errors import MoeforgeError

from .conftest import VOCAB, llama, moe


def other_tokenizer(swap=("a", "b")):
    """The character tokenizer with two letters' ids swapped: same size, different vocabulary."""
    from moeforge.compose.kv_task import char_tokenizer

    vocab = char_tokenizer().get_vocab()
    vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_mismatched_tokenizers_refused(tokenizer):
    with pytest.raises(MoeforgeError, match=r"different tokenizers: token 'a' has id 3 in the anchor's vocabulary and 4 "
                                            r"in the augmenting model's \(2 of the 44 tokens in either vocabulary differ\)"):
        compose(llama(), moe(), num_connections=1, anchor_tokenizer=tokenizer, augmenting_tokenizer=other_tokenizer())


def test_mismatched_tokenizers_on_disk_refused(saved_models, tmp_path):
    other_tokenizer().save_pretrained(saved_models["augmenting"])
    with pytest.raises(MoeforgeError, match="use different tokenizers"):
        compose(saved_models["anchor"], saved_models["augmenting"], num_connections=1)


def test_count_of_differing_tokens_never_exceeds_the_vocabularies(tokenizer):
    """Tokens of one vocabulary only count out of the union of both (the message said "91 of 53")."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"T{i}": 3 + i for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(MoeforgeError, match=rf"\({VOCAB - 3 + 50} of the {VOCAB + 50} tokens in either vocabulary differ\)"):
        check_shared_vocabulary(llama(), moe(vocab=60), tokenizer, other)


def test_vocabulary_sizes_compared_without_tokenizers():
    with pytest.raises(MoeforgeError, match=f"has a {VOCAB}-token vocabulary and the augmenting model .* a 300-token one"):
        compose(llama(), moe(vocab=300), num_connections=1)


def test_tokenizer_bigger_than_a_model_refused(tokenizer):
    with pytest.raises(MoeforgeError, match="embeds 20 tokens but the shared tokenizer has ids up to 43"):
        check_shared_vocabulary(llama(vocab=20), moe(), tokenizer, tokenizer)


def test_compose_from_paths(saved_models):
    composed = compose(saved_models["anchor"], saved_models["augmenting"], num_connections=2)
    assert composed.sources["anchor"] == str(saved_models["anchor"].resolve())
    ids = torch.randint(3, 40, (1, 6))
    with torch.no_grad():
        assert torch.equal(composed(ids).logits, composed.anchor(ids).logits)


def test_paths_without_tokenizer_files_fall_back_to_the_vocabulary_sizes(tmp_path):
    for name, model in (("anchor", llama()), ("augmenting", moe())):
        model.save_pretrained(tmp_path / name)  # weights and config only
    composed = compose(tmp_path / "anchor", tmp_path / "augmenting", num_connections=1)
    assert composed.sources["augmenting"] == str((tmp_path / "augmenting").resolve())
    moe(vocab=300).save_pretrained(tmp_path / "wide")
    with pytest.raises(MoeforgeError, match="a 300-token one"):
        compose(tmp_path / "anchor", tmp_path / "wide", num_connections=1)


def test_missing_model(saved_models, tmp_path):
    with pytest.raises(MoeforgeError, match=r"^augmenting model: model '.*nowhere' not found"):
        compose(saved_models["anchor"], tmp_path / "nowhere", num_connections=1)


def test_more_connections_than_layers(anchor, augmenting):
    with pytest.raises(MoeforgeError, match="num_connections=3 is more than the 2 layers of the augmenting model"):
        compose(anchor, augmenting, num_connections=3)


def test_compose_from_config_is_the_trainers_entry_point(saved_models, anchor, tmp_path):
    composed = compose_from_config(anchor, {"augmenting": str(saved_models["augmenting"]), "num_connections": 2,
                                            "norm": False})
    assert composed.calm_config.norm is False and len(composed.connections) == 2
    ids = torch.randint(3, 40, (2, 7))
    composed.train()
    out = composed(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.loss.ndim == 0 and out.logits.shape == (2, 7, VOCAB)
    assert {n.split(".")[0] for n, p in composed.named_parameters() if p.requires_grad} == {"connections"}
    composed.save_trained(tmp_path / "final")
    again = compose_from_config(anchor, {"augmenting": str(saved_models["augmenting"]), "num_connections": 2,
                                         "norm": False, "init_from": str(tmp_path / "final")})
    for a, b in zip(composed.composition_parameters(), again.composition_parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"num_connections": 2}, "needs 'augmenting'"),
        ({"augmenting": "x", "num_conections": 2}, "Did you mean 'num_connections'"),
        ({"augmentin": "x"}, "Did you mean 'augmenting'"),
        ({"augmenting": "/no/such/model"}, "augmenting model: model '/no/such/model' not found"),
        ("augmenting: x", "must be a mapping"),
    ],
)
def test_bad_compose_sections(anchor, section, message):
    with pytest.raises(MoeforgeError, match=message):
        compose_from_config(anchor, section)
