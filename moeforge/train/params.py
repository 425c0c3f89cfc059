"""What trains: the whole model, the MoE layers, the routers, or what a PEFT/CALM wrapper leaves trainable.

After the model is loaded, a ``peft:`` section hands it to ``moeforge.peft.wrap_from_config``
and a ``compose:`` section to ``moeforge.compose.compose_from_config``; those wrappers set
``requires_grad`` themselves. Otherwise ``train_params`` decides:

=======  ===============================================================
all      every parameter (also what ``auto`` means without a wrapper)
moe      experts, shared experts (with their gate, if any) and routers of the MoE layers
router   the routers only
=======  ===============================================================
"""

from __future__ import annotations

from torch import nn

from ..errors import MoeforgeError


def apply_wrappers(model: nn.Module, config, tokenizer=None) -> nn.Module:
    """Wrap ``model`` as the config's ``peft``/``compose`` section says (lazy imports)."""
    if config.peft is not None:
        from ..peft import wrap_from_config

        return wrap_from_config(model, config.peft)
    if config.compose is not None:
        from ..compose import compose_from_config

        return compose_from_config(model, config.compose, anchor_tokenizer=tokenizer)
    return model


def select_trainable(model: nn.Module, train_params: str) -> None:
    """Set ``requires_grad`` for ``train_params`` in all / moe / router (``auto`` = all)."""
    from ..moe.layer import MoELayer
    from ..moe.routers import Router

    if train_params in ("auto", "all"):
        for p in model.parameters():
            p.requires_grad_(True)
        return
    kind = MoELayer if train_params == "moe" else Router
    chosen = [m for m in model.modules() if isinstance(m, kind)]
    if not chosen:
        raise MoeforgeError(
            f"train_params={train_params!r} needs a MoE model, but {type(model).__name__} has no "
            f"{'MoE layers' if kind is MoELayer else 'routers'}; use train_params: all or convert the model first."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for m in chosen:
        for p in m.parameters():
            p.requires_grad_(True)


def prepare_model(model: nn.Module, config, tokenizer=None) -> nn.Module:
    """Apply the wrappers or ``train_params``; refuse a model with nothing to train."""
    if config.peft is not None or config.compose is not None:
        model = apply_wrappers(model, config, tokenizer)
    else:
        select_trainable(model, config.train_params)
    if not any(p.requires_grad for p in model.parameters()):
        raise MoeforgeError("no parameter of the model is trainable; check train_params or the peft/compose section.")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
