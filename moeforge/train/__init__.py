"""Training: one trainer for continual pre-training, SFT, parameter-efficient MoE and composition.

Stable Python API::

    from moeforge.train import train, load_config
    result = train("configs/cpt_smollm2_moe.yaml", overrides={"steps": 20})
    result = train({"model": ..., "output_dir": ..., "data": [...]}, model=my_model, tokenizer=my_tok)

See :class:`TrainConfig` for every setting and :class:`TrainResult` for what comes back.
"""

from .config import DataSource, DistillConfig, MixtureConfig, TrainConfig, load_config
from .metrics import read_metrics, write_plots
from .mixture import Mixture, dynamic_update
from .schedule import lr_at
from .trainer import Trainer, TrainResult, train

__all__ = [
    "train",
    "Trainer",
    "TrainResult",
    "TrainConfig",
    "DataSource",
    "MixtureConfig",
    "DistillConfig",
    "load_config",
    "dynamic_update",
    "Mixture",
    "lr_at",
    "read_metrics",
    "write_plots",
]
