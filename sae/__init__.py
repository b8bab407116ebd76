"""TopK sparse autoencoders (Gao et al. 2024): model, sparse kernels, training, evaluation, LM hooks.

The names below load on first use, so that a command that reads only `sae.config` (validate, ls,
status) does not pay for importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae.config import SAEConfig, TrainConfig, auto_lr
    from sae.evaluation import EvalPlan, EvalRecord, EvalSource, evaluate_sae
    from sae.model import Codes, NormStats, TopKSAE
    from sae.train import Trainer, TrainResult, train_sae, train_saes

_HOME = {
    "SAEConfig": "sae.config",
    "TrainConfig": "sae.config",
    "auto_lr": "sae.config",
    "EvalPlan": "sae.evaluation",
    "EvalRecord": "sae.evaluation",
    "EvalSource": "sae.evaluation",
    "evaluate_sae": "sae.evaluation",
    "Codes": "sae.model",
    "NormStats": "sae.model",
    "TopKSAE": "sae.model",
    "Trainer": "sae.train",
    "TrainResult": "sae.train",
    "train_sae": "sae.train",
    "train_saes": "sae.train",
}

__all__ = [
    "Codes",
    "EvalPlan",
    "EvalRecord",
    "EvalSource",
    "NormStats",
    "SAEConfig",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "auto_lr",
    "evaluate_sae",
    "train_sae",
    "train_saes",
]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
