"""How many positions a model can attend to."""

from __future__ import annotations


def model_context(model) -> int | None:
    """Positions ``model`` can attend to (``config.max_position_embeddings``), None when it does not
    say; a CALM composition runs both its models on every token, so its context is the smaller of
    the anchor's and the augmenting model's."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    augmenting = getattr(getattr(getattr(model, "augmenting", None), "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and isinstance(augmenting, int):
        context = min(context, augmenting)
    return context if isinstance(context, int) else None
