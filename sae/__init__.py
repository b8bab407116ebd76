"""TopK sparse autoencoders (Gao et al. 2024): model, sparse kernels, training, evaluation, LM hooks."""

from sae.config import SAEConfig, TrainConfig, auto_lr
from sae.evaluation import EvalPlan, EvalRecord, EvalSource, evaluate_sae
from sae.model import Codes, NormStats, TopKSAE
from sae.train import Trainer, TrainResult, train_sae, train_saes

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
