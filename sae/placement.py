"""Where a trainer's SAE lives: whole in this process (`OneProcess`, the default) or one shard on a
grid of processes (sae.parallel.GridShard). A Trainer is given its placement when it is built and
asks it what it needs; it never asks which one it has.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sae.config import SAEConfig
from sae.loss import Latents, WholeLatents
from sae.model import TopKSAE


class Placement(Latents, Protocol):
    """The loss's hooks (sae.loss.Latents) and the trainer's: `processes` is the number of processes
    training this SAE together."""

    processes: int

    def part(self, full: TopKSAE) -> TopKSAE:
        """This process's part of a whole SAE."""
        ...

    def count_dead(self, mask: torch.Tensor) -> tuple[int, int]:
        """(dead latents here, dead latents of the whole SAE): one host sync."""
        ...

    def average_gradients(self, sae: TopKSAE) -> None: ...

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes that saw the other rows of the batch."""
        ...

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes that hold the other latents."""
        ...

    def min_over_all(self, t: torch.Tensor) -> torch.Tensor: ...

    def rows_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of t from every process that saw a part of the batch, in rank order."""
        ...


class OneProcess(WholeLatents):
    """The whole SAE in this process: nothing to split, count across or average."""

    processes = 1

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg.n_latents, cfg.k)

    def part(self, full: TopKSAE) -> TopKSAE:
        return full

    def count_dead(self, mask: torch.Tensor) -> tuple[int, int]:
        dead = int(mask.sum())
        return dead, dead

    def average_gradients(self, sae: TopKSAE) -> None:
        return None

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min_over_all(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def rows_over_data(self, t: torch.Tensor) -> torch.Tensor:
        return t
