"""Activations a user already has, as a stream of training batches: a tensor, an array, a .npy file
or an iterable of batches. No framework, no store: what `sae.train_sae` accepts."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

Activations = torch.Tensor | np.ndarray | str | os.PathLike | Iterable[torch.Tensor]


def open_activations(data: Activations) -> tuple[Iterable[torch.Tensor] | torch.Tensor | np.ndarray, int | None]:
    """(rows or batches, number of rows when known). A .npy file is memory-mapped, never unpickled."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix != ".npy":
            raise ValueError(f"{path}: activations from a file must be a .npy array of shape (rows, d)")
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if data.ndim != 2:
            raise ValueError(f"activations must have shape (rows, d), got {tuple(data.shape)}")
        return data, data.shape[0]
    if isinstance(data, (str, os.PathLike)):  # unreachable: a path was loaded above
        raise TypeError(f"{data}: not loaded")
    return data, None


def batch_stream(data, batch_tokens: int, passes: int | None = 1) -> Iterator[torch.Tensor]:
    """Float32 batches of `batch_tokens` rows, in order, over `passes` passes (None: forever) of an
    in-memory array; an iterable of batches is passed through as it is (its own batch sizes)."""
    if not isinstance(data, (torch.Tensor, np.ndarray)):
        yield from (torch.as_tensor(b).float() for b in data)
        return
    for _ in range(passes) if passes is not None else itertools.count():
        for start in range(0, data.shape[0], batch_tokens):
            rows = data[start : start + batch_tokens]
            yield rows.float() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows, dtype=np.float32))


def head_sample(batches: Iterator[torch.Tensor], rows: int) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The first `rows` rows of a stream (the initialisation sample) and the whole stream again."""
    head: list[torch.Tensor] = []
    taken = 0
    for batch in batches:
        head.append(batch)
        taken += batch.shape[0]
        if taken >= rows:
            break
    if not head:
        raise ValueError("the activation stream is empty")
    return torch.cat(head)[:rows], itertools.chain(head, batches)
