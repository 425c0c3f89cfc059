"""moeforge: turn pretrained dense language models into Mixture-of-Experts models.

Importing moeforge registers its model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` opens checkpoints moeforge writes in its own format.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import models as _models  # noqa: F401  (Auto class registration)
from .errors import MoeforgeError
from .loading import load, load_tokenizer, load_trained, load_with_tokenizer
from .moe import MoEConfig, MoELayer
from . import convert  # noqa: E402  callable: moeforge.convert(model, out=..., method=..., ...)
from .convert import ConvertConfig  # noqa: E402
from .eval.evaluate import evaluate  # noqa: E402  perplexity per corpus, cost and routing statistics

__all__ = [
    "MoeforgeError",
    "MoEConfig",
    "MoELayer",
    "load",
    "load_tokenizer",
    "load_trained",
    "load_with_tokenizer",
    "convert",
    "ConvertConfig",
    "evaluate",
    "__version__",
]
