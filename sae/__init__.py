"""TopK sparse autoencoders (Gao et al. 2024): model, sparse kernels, training, metrics, LM hooks."""

from sae.config import SAEConfig, TrainConfig, auto_lr
from sae.model import Codes, NormStats, TopKSAE
from sae.train import Trainer, TrainResult, train_sae, train_saes

__all__ = ["Codes", "NormStats", "SAEConfig", "TopKSAE", "TrainConfig", "TrainResult", "Trainer", "auto_lr",
           "train_sae", "train_saes"]
