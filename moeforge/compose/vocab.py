"""The shared-tokenizer check of a composition: both models read the same token ids (CALM, Sec. 3).

With both tokenizers at hand the check compares the full token -> id maps; without them it
falls back to the embedding sizes, which catches different vocabularies but not a permutation of
one — pass the tokenizers (or models loaded from checkpoints that hold them) for the full check.
Special-token ids in the configs are not compared: base and instruct variants of one tokenizer
often differ there (SmolLM2 base ends with id 0, the instruct model with id 2).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MoeforgeError


def embedding_size(model) -> int:
    """Rows of the input embedding: the largest token id + 1 the model accepts."""
    return int(model.get_input_embeddings().num_embeddings)


def find_tokenizer(model):
    """The tokenizer saved beside ``model``'s checkpoint (its ``name_or_path``), or None."""
    from ..loading import ALIASES, load_tokenizer

    name = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
    if not name or (name not in ALIASES and not Path(str(name)).expanduser().exists()):
        return None
    try:
        return load_tokenizer(name)
    except Exception:  # no tokenizer files there: the caller falls back to the config check
        return None


def _first_difference(anchor_vocab: dict[str, int], aug_vocab: dict[str, int]) -> tuple[str, int]:
    differ = [t for t in anchor_vocab if aug_vocab.get(t) != anchor_vocab[t]]
    differ += [t for t in aug_vocab if t not in anchor_vocab]
    differ.sort(key=lambda t: anchor_vocab.get(t, aug_vocab.get(t, 0)))
    return differ[0], len(differ)


def check_shared_vocabulary(
    anchor,
    augmenting,
    anchor_tokenizer=None,
    augmenting_tokenizer=None,
    *,
    anchor_name: str = "anchor",
    augmenting_name: str = "augmenting",
) -> str:
    """Refuse two models that do not share a tokenizer; return "tokenizers" or "configs" (what was compared).

    Raises :class:`MoeforgeError` naming the first differing token and how many differ.
    """
    hint = (
        "CALM feeds the same token ids to both models, so they must share one tokenizer; "
        "choose an augmenting model trained with the anchor's tokenizer."
    )
    if anchor_tokenizer is not None and augmenting_tokenizer is not None:
        va, vb = anchor_tokenizer.get_vocab(), augmenting_tokenizer.get_vocab()
        if va != vb:
            token, count = _first_difference(va, vb)
            raise MoeforgeError(
                f"the anchor ({anchor_name}) and augmenting ({augmenting_name}) models use different tokenizers: "
                f"token {token!r} has id {va.get(token)} in the anchor's vocabulary and {vb.get(token)} in the "
                f"augmenting model's ({count} of the {len(va.keys() | vb.keys())} tokens in either vocabulary differ). {hint}"
            )
        need = max(va.values(), default=-1) + 1
        for role, name, model in (("anchor", anchor_name, anchor), ("augmenting", augmenting_name, augmenting)):
            if embedding_size(model) < need:
                raise MoeforgeError(
                    f"the {role} model ({name}) embeds {embedding_size(model)} tokens but the shared tokenizer has "
                    f"ids up to {need - 1}; the tokenizer does not belong to this model."
                )
        return "tokenizers"
    na, nb = embedding_size(anchor), embedding_size(augmenting)
    if na != nb:
        raise MoeforgeError(
            f"the anchor ({anchor_name}) has a {na}-token vocabulary and the augmenting model ({augmenting_name}) "
            f"a {nb}-token one. {hint} (If they do share a tokenizer with padded embeddings, pass both "
            "tokenizers so the full vocabularies can be compared.)"
        )
    return "configs"


__all__ = ["check_shared_vocabulary", "embedding_size", "find_tokenizer"]
