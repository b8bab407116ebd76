"""The order in which the train stage draws an activation store's rows, apart from reading them.

Random single-row reads would touch nearly every chunk, so each epoch visits whole chunks in a random
order, cut into blocks of about `buffer_chunks` chunks, and shuffles rows inside a block. Each block
draws its permutation from (seed, epoch, block, part) and yields only whole batches: its last rows,
fewer than a batch, sit this epoch out (other rows sit out the next). So a block needs nothing from
the one before it, and a resumed run finds its place by arithmetic, reading nothing before its block.

`part=(i, P)`: the i-th of P data-parallel readers, which takes every P-th chunk of the epoch's shared
order and batches of batch_rows / P rows (together the P parts make the global batch; no reader reads
another's rows).

`group_chunks=G` (the bounded window, storage/window.py): one pass over the rows, group after group of
G consecutive chunks, each group's chunks in a random order of their own. A group's rows are all drawn
before the next group's first, so a group can be deleted once its last batch is trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# a buffer this size holds the demo's whole store (115 MB): its batches then draw on as many documents
# as a uniform shuffle's (docs/benchmarks.md, "How well the reader shuffles")
SHUFFLE_BUFFER_MB = 256


@dataclass(frozen=True)
class Block:
    chunks: np.ndarray  # chunk indices, in the order their rows are concatenated
    rows: int  # the block's chunks' rows together
    permutation: np.ndarray  # over the block's concatenated rows: batch b is permutation[b*B:(b+1)*B]
    skip: int  # batches of this block already drawn (a resumed run's place in it)
    batches: int  # whole batches in the block
    group: int = 0  # the group of chunks it draws from (always 0 without group_chunks)


@dataclass(frozen=True)
class ChunkOrder:
    n_rows: int
    chunk_rows: int
    batch_rows: int  # the global batch: each of the P parts draws batch_rows // P rows
    buffer_chunks: int
    seed: int
    part: tuple[int, int] = (0, 1)
    group_chunks: int | None = None  # set: one pass, in groups of this many consecutive chunks

    def __post_init__(self):
        index, parts = self.part
        if self.n_chunks < parts:
            raise ValueError(
                f"the store has {self.n_chunks} chunks of rows, fewer than its {parts} data-parallel readers: "
                "cache more tokens or train on fewer replicas"
            )
        fewest = (len(range(index, self.n_chunks, parts)) - 1) * self.chunk_rows + self.rows_of(self.n_chunks - 1)
        if fewest < self.part_batch:
            raise ValueError(
                f"a reader's share of the store, {fewest} rows, is less than one batch of {self.part_batch}: "
                "cache more tokens or train with a smaller batch"
            )

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    @property
    def part_batch(self) -> int:
        return self.batch_rows // self.part[1]

    @property
    def block_chunks(self) -> int:
        """Chunks per block: at least the buffer, and enough whole chunks for a batch next to a short
        last chunk, so that every block yields a batch."""
        return max(self.buffer_chunks, math.ceil(self.part_batch / self.chunk_rows) + 1)

    def rows_of(self, chunk: int) -> int:
        return min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)

    @property
    def n_groups(self) -> int:
        return 1 if self.group_chunks is None else math.ceil(self.n_chunks / self.group_chunks)

    def epoch_blocks(self, epoch: int) -> list[np.ndarray]:
        """The chunks of each of this part's blocks in an epoch: its share of each group's shared chunk
        order (one group of every chunk without group_chunks), split into blocks of block_chunks to
        2 * block_chunks - 1 chunks."""
        index, parts = self.part
        if self.group_chunks is None:
            mine = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)[index::parts]
            return np.array_split(mine, max(1, len(mine) // self.block_chunks))
        blocks = []
        for g in range(self.n_groups):
            first = g * self.group_chunks
            count = min(self.group_chunks, self.n_chunks - first)
            mine = first + np.random.default_rng([self.seed, epoch, g]).permutation(count)[index::parts]
            blocks += np.array_split(mine, max(1, len(mine) // self.block_chunks)) if len(mine) else []
        return blocks

    def group_of(self, chunk: int) -> int:
        return 0 if self.group_chunks is None else chunk // self.group_chunks

    def blocks(self, start_batch: int = 0) -> Iterator[Block]:
        """This part's blocks from the one holding batch `start_batch` on: endlessly, or to the end of
        the one pass with group_chunks."""
        drawn, epoch = 0, 0
        while True:
            for b, chunks in enumerate(self.epoch_blocks(epoch)):
                rows = sum(self.rows_of(int(c)) for c in chunks)
                batches = rows // self.part_batch
                if drawn + batches > start_batch:
                    rng = np.random.default_rng([self.seed, epoch, b, self.part[0]])
                    group = self.group_of(int(chunks[0]))
                    yield Block(chunks, rows, rng.permutation(rows), max(0, start_batch - drawn), batches, group)
                drawn += batches
            if self.group_chunks is not None:
                return
            epoch += 1

    def group_ends(self) -> list[int]:
        """With group_chunks: the batches this part has drawn when each group's last batch is drawn
        (the last entry is the whole pass)."""
        ends = [0] * self.n_groups
        for chunks in self.epoch_blocks(0):
            ends[self.group_of(int(chunks[0]))] += sum(self.rows_of(int(c)) for c in chunks) // self.part_batch
        return list(np.cumsum(ends).tolist())


def mixing(order: ChunkOrder, group_of_row: np.ndarray, batches: int, seed: int = 0) -> tuple[float, float]:
    """Distinct groups (documents, or contexts) per batch: the mean over the first `batches` batches of
    `order`, and the mean over as many batches drawn uniformly without replacement from all rows."""
    ours, drawn = [], 0
    for block in order.blocks():
        rows = np.concatenate(
            [np.arange(c * order.chunk_rows, c * order.chunk_rows + order.rows_of(int(c))) for c in block.chunks]
        )
        for b in range(block.batches):
            picked = rows[block.permutation[b * order.part_batch : (b + 1) * order.part_batch]]
            ours.append(len(np.unique(group_of_row[picked])))
            drawn += 1
            if drawn == batches:
                rng = np.random.default_rng(seed)
                uniform = [
                    len(np.unique(group_of_row[rng.choice(order.n_rows, order.part_batch, replace=False)]))
                    for _ in range(batches)
                ]
                return float(np.mean(ours)), float(np.mean(uniform))
    raise AssertionError("unreachable: blocks() is endless")
