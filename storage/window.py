"""The bounded window (data.window_shards = W): runs larger than a disk. The train split's shards are
cached while the SAEs train on them, at most W on disk at once, each deleted once a checkpoint covers
its rows; the eval split is cached whole as always.

The SAEs read the train split once, group after group of W // 2 consecutive shards (the `group_chunks`
of storage.shuffle.ChunkOrder), so the next group is cached while one is trained on. The trainer
checkpoints as it finishes a group and then releases it: its shards are deleted, and the cursor below
moves on, letting caching start on the group after next. Caching, the trainer and its reader share
only these files under {store}/_window/:

    session      a token written by the flow that feeds the window, before the train task starts
    cursor.json  {"session": ..., "released": k}: the trainer of that session needs no shard below k
    stop         why caching gave up: a reader waiting for a shard raises with it

A killed run resumes at its last checkpoint, whose group's shards were not released, and reads the
same batches again; shards it never reached are cached on demand.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import zlib
from dataclasses import dataclass

from storage.activations import (
    filesystem,
    layout_of,
    marker_path,
    meta_of,
    open_group_for_status,
    read_marker,
    shard_file,
    window_of,
    write_marker,
)
from storage.shuffle import Block, ChunkOrder

log = logging.getLogger(__name__)

DIR = "_window"
WAIT_SECONDS = 3600.0  # a reader gives up on a shard no caching has produced in this long


class CachingStopped(RuntimeError):
    """The window's caching failed, so the shards the trainer waits for will not come."""


@dataclass(frozen=True)
class Window:
    url: str
    storage_options: dict | None
    shards: int  # W: train shards on disk at most
    n_shards: int  # train shards of the whole pass
    chunks_per_shard: int
    hookpoints: tuple[str, ...]

    @classmethod
    def of(cls, url: str, storage_options: dict | None = None) -> Window | None:
        """The window of the store at url, or None when its train split is cached whole."""
        group = open_group_for_status(url, storage_options)
        shards = window_of(group)
        if not shards:
            return None
        layout = layout_of(group, "train")
        per_shard = layout.shard_contexts // layout.chunk_contexts
        return cls(url, storage_options, shards, layout.n_shards, per_shard, tuple(meta_of(group)["hookpoints"]))

    @property
    def group_shards(self) -> int:
        return self.shards // 2

    @property
    def group_chunks(self) -> int:
        return self.group_shards * self.chunks_per_shard

    def shards_of(self, block: Block) -> list[int]:
        return sorted({int(c) // self.chunks_per_shard for c in block.chunks})

    # files ---------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self._root}/{DIR}/{name}"

    @property
    def _root(self) -> str:
        return filesystem(self.url, self.storage_options)[1]

    @property
    def _fs(self):
        return filesystem(self.url, self.storage_options)[0]

    def open_session(self) -> str:
        """A new feeding session (by the flow): its token, and no stop left from an earlier one."""
        token = uuid.uuid4().hex
        fs = self._fs
        fs.makedirs(f"{self._root}/{DIR}", exist_ok=True)
        if fs.exists(self._path("stop")):
            fs.rm_file(self._path("stop"))
        write_marker(fs, self._path("session"), token.encode())
        return token

    def cursor(self) -> tuple[str | None, int]:
        """(session, released) as the trainer last wrote them; (None, 0) before any trainer."""
        found = read_marker(self._fs, self._path("cursor.json"))
        return (found["session"], int(found["released"])) if found else (None, 0)

    def release(self, upto: int) -> None:
        """The trainer needs no train shard below `upto`: deletes them (each marker first: the shard
        stops counting as cached), then moves the cursor, which lets caching go on (so the window
        never holds more than W). A kill in between costs nothing: a trainer starting again writes
        its own cursor before caching goes on."""
        fs = self._fs
        for i in range(upto):
            marker = marker_path(self._root, "train", i)
            if fs.exists(marker):
                fs.rm_file(marker)
            for h in self.hookpoints:
                if fs.exists(shard_file(self._root, "train", h, i)):
                    fs.rm_file(shard_file(self._root, "train", h, i))
        try:
            session = fs.cat_file(self._path("session")).decode()
        except FileNotFoundError:
            session = None  # trained without a feeding flow (the Python API)
        fs.makedirs(f"{self._root}/{DIR}", exist_ok=True)
        write_marker(fs, self._path("cursor.json"), json.dumps({"session": session, "released": upto}).encode())

    def to_cache(self, session: str) -> list[int] | None:
        """Train shards to cache now: those without a marker among the W from the trainer's cursor.
        None until the trainer of `session` has written its cursor (it knows where it resumes)."""
        at, released = self.cursor()
        if at != session:
            return None
        fs = self._fs
        return [
            i
            for i in range(released, min(released + self.shards, self.n_shards))
            if read_marker(fs, marker_path(self._root, "train", i)) is None
        ]

    def on_disk(self) -> list[int]:
        """Train shards that hold data now (for tests and reports)."""
        fs = self._fs
        return [i for i in range(self.n_shards) if fs.exists(shard_file(self._root, "train", self.hookpoints[0], i))]

    def stop(self, reason: str) -> None:
        fs = self._fs
        fs.makedirs(f"{self._root}/{DIR}", exist_ok=True)
        write_marker(fs, self._path("stop"), reason.encode())

    def wait(self, shards: list[int], timeout: float = WAIT_SECONDS, poll: float = 0.2) -> None:
        """Returns once every shard is cached and matches its checksums. A damaged one loses its marker
        (caching recomputes it) and is waited for again; a stop or the timeout raises."""
        fs, pending = self._fs, list(shards)
        deadline = time.monotonic() + timeout
        while pending:
            marker = read_marker(fs, marker_path(self._root, "train", pending[0]))
            if marker is not None and self._intact(pending[0], marker):
                pending.pop(0)
                continue
            if fs.exists(self._path("stop")):
                raise CachingStopped(f"{self.url}: caching stopped: {fs.cat_file(self._path('stop')).decode()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.url}: train shard {pending[0]} was not cached within {timeout:.0f} s: with "
                    "data.window_shards the train stage runs beside caching (`saeflow train SPEC` feeds it)"
                )
            time.sleep(poll)

    def _intact(self, i: int, marker: dict) -> bool:
        fs = self._fs
        for h, crc in marker["crc32"].items():
            path = shard_file(self._root, "train", h, i)
            try:
                actual = zlib.crc32(fs.cat_file(path))
            except FileNotFoundError:
                actual = None
            if actual != crc:
                log.warning("train shard %d of %s is corrupted or gone (%s): caching it again", i, h, path)
                fs.rm_file(marker_path(self._root, "train", i))
                return False
        return True


def released_through(order: ChunkOrder, window: Window, batches: int) -> int:
    """The first train shard still needed by a trainer that has drawn `batches` batches of `order`:
    the first shard of the group it is in (the pass's end: every shard)."""
    done = sum(1 for end in order.group_ends() if end <= batches)
    return min(done * window.group_shards, window.n_shards)


@dataclass(frozen=True)
class TrainerSide:
    """What the train stage does about a window, in one place: which tokens one pass yields, where it
    checkpoints, which shards it waits for and releases. Without a window (`window` None) the pass is
    endless and every step here does nothing; only the lead process releases."""

    window: Window | None
    order: ChunkOrder
    lead: bool = True

    def pass_tokens(self, whole: int) -> int:
        """The tokens a run can train on: one pass's whole batches with a window, else `whole`."""
        return self.order.group_ends()[-1] * self.order.batch_rows if self.window else whole

    def checkpoint_tokens(self) -> list[int]:
        """A group is released at a checkpoint past its end: one comes at every group's end."""
        return [e * self.order.batch_rows for e in self.order.group_ends()[:-1]] if self.window else []

    def initial_chunks(self) -> int | None:
        """The chunks the initialisation may sample: the first group's (all without a window)."""
        return min(self.order.group_chunks, self.order.n_chunks) if self.order.group_chunks else None

    def wait_initial(self) -> None:
        if self.window:
            self.window.wait(list(range(min(self.window.group_shards, self.window.n_shards))))

    def waiter(self):
        """The reader's `wait(block)`: returns once the block's shards are on disk."""
        window = self.window
        return (lambda block: window.wait(window.shards_of(block))) if window else None

    def release_covered(self, batches: int) -> None:
        """Releases the groups a trainer that has drawn `batches` batches (and saved them in a
        checkpoint) will not read again."""
        if self.window and self.lead:
            self.window.release(released_through(self.order, self.window, batches))

    def release_all(self) -> None:
        """The SAEs are written: no train shard is needed again."""
        if self.window and self.lead:
            self.window.release(self.window.n_shards)
