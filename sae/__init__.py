"""TopK sparse autoencoders (Gao et al. 2024): model, sparse kernels, training, metrics, LM hooks."""

from sae.config import SAEConfig, TrainConfig
from sae.model import Codes, TopKSAE

__all__ = ["Codes", "SAEConfig", "TopKSAE", "TrainConfig"]
