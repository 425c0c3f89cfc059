"""Composition of two frozen causal LMs with CALM cross-attention (Bansal et al. 2024, arXiv 2401.02412).

>>> from moeforge.compose import compose
>>> model = compose("path/to/anchor", "path/to/augmenting", num_connections=4)  # doctest: +SKIP
>>> model(input_ids).logits                                                      # doctest: +SKIP

Modules: :mod:`.config` (CALMConfig), :mod:`.layers` (projection + causal cross-attention),
:mod:`.model` (ComposedForCausalLM, the composition cache), :mod:`.generation` (decoding),
:mod:`.vocab` (shared-tokenizer check), :mod:`.checkpoint` (saving the composition weights
alone), :mod:`.build` (compose / compose_from_config / load_composition), :mod:`.kv_task`
(the synthetic key-value arithmetic task of the paper's Sec. 4.1).
"""

from .build import compose, compose_from_config, load_composition
from .config import CALMConfig
from .model import ComposedCausalLMOutput, ComposedForCausalLM, CompositionCache

__all__ = [
    "CALMConfig", "ComposedCausalLMOutput", "ComposedForCausalLM", "CompositionCache",
    "compose", "compose_from_config", "load_composition",
]
