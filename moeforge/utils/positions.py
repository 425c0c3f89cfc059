"""How many positions a model can attend to."""

from __future__ import annotations


def model_context(model) -> int | None:
    """Positions ``model`` can attend to (``max_position_embeddings`` of its text config: the
    config itself, or ``text_config`` of a multimodal one), None when it does not say; a CALM
    composition runs both its models on every token, so its context is the smaller of the
    anchor's and the augmenting model's."""
    context = _context(getattr(model, "config", None))
    augmenting = _context(getattr(getattr(model, "augmenting", None), "config", None))
    if context is not None and augmenting is not None:
        context = min(context, augmenting)
    return context


def _context(config) -> int | None:
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) else None
