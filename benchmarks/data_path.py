"""The train stage's input path, end to end: rows/s and GB/s from an activation store on disk, written
by the store's own writer, through exactly what the train stage runs (shuffled batches, the prefetch
thread, the copy to the device), next to the reader as it was before it was reworked, a plain
sequential read of the same array, and training itself from memory and from the store, in one run.

    python benchmarks/data_path.py [--d 576,2304] [--tokens 262144] [--batch 4096] [--latents 4096]
                                   [--device cpu|cuda] [--seconds 6] [--store-dir DIR]

The store's activations come from a stand-in LM (an embedding plus per-token noise, so that the
rows are as incompressible as real activations: the demo store compresses by 1.0004) run through
`storage.shard_writer.write_shard`, as `saeflow cache` runs a real model, once with the old default
compression (zstd) and once with today's (none). The reader is measured with 1, 2 and as many
threads as there are cores (`shuffled_batches(readers=...)`), and so are its chunk reads alone (on a
GPU host all the reader does on the CPU: a batch is gathered and converted on the device); training
(`train_saes`, as the train stage calls it) from random in-memory batches, from the store's batches
held in memory, and from the store's reader (the same batches in the same order), over at least two
of the reader's blocks.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer, train_saes
from storage import activations as store
from storage import reading, shard_writer
from storage.chunk_reads import chunk_reader
from storage.corpus import Contexts
from storage.shuffle import SHUFFLE_BUFFER_MB

HOOK = "layer"
CONTEXT = 64


class StandIn(nn.Module):
    """What write_shard needs of an LM: a module named HOOK whose output is (B, L, d) activations."""

    def __init__(self, d: int, vocab: int = 32000):
        super().__init__()
        self.layer = _Noisy(vocab, d)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.layer(input_ids)


class _Noisy(nn.Embedding):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(int(input[0, 0])))


def build_store(root: Path, d: int, tokens: int, compression: str) -> str:
    """A finished store of `tokens` training rows at width d, written by the store's writer."""
    url = str(root / f"d{d}-{compression}")
    n = math.ceil(tokens / (CONTEXT - 1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (n, CONTEXT), dtype=np.int32)
    docs = np.repeat(np.arange(n, dtype=np.int32)[:, None], CONTEXT, axis=1)
    positions = np.tile(np.arange(CONTEXT, dtype=np.int32), (n, 1))
    contexts = Contexts(ids, docs, positions, [f"doc-{i}" for i in range(n)])
    store.plan_store(
        url,
        {"train": contexts},
        [HOOK],
        d_model=d,
        first_position=1,
        compression=compression,
        attrs={"spec_hash": "bench"},
    )
    model = StandIn(d).eval()
    with torch.no_grad():
        for split, index in store.missing_shards(url):
            shard_writer.write_shard(url, split, index, model, batch_contexts=64)
    store.finalize_store(url)
    return url


def on_disk(url: str) -> int:
    return sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file() and "/acts/" in str(f))


def reader_before(array, batch_rows: int, seed: int = 0, buffer_chunks: int = 8):
    """The reader before it was reworked, for comparison: one thread decodes each chunk of an 8-chunk
    buffer to float32, the buffer is concatenated and permuted, and batches are sliced from it."""
    rng = np.random.default_rng(seed)
    rows = array.chunks[0]
    n_chunks = math.ceil(array.shape[0] / rows)
    carry = torch.empty(0, array.shape[1])
    while True:
        order = rng.permutation(n_chunks)
        for i in range(0, len(order), buffer_chunks):
            parts = [
                torch.from_numpy(np.asarray(array[c * rows : (c + 1) * rows]).astype(np.float32))
                for c in order[i : i + buffer_chunks]
            ]
            buf = torch.cat([carry, *parts])
            buf = buf[torch.from_numpy(rng.permutation(len(buf)))]
            n_full = len(buf) // batch_rows
            for b in range(n_full):
                yield buf[b * batch_rows : (b + 1) * batch_rows]
            carry = buf[n_full * batch_rows :]


def rate(batches, seconds: float, device: str) -> float:
    """Rows per second drawn from `batches` (each copied to the device) over about `seconds`."""
    rows, start = 0, time.perf_counter()
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        rows += batch.shape[0]
        if time.perf_counter() - start >= seconds:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    batches.close()  # its threads stop before the next measurement
    return rows / seconds


def block_read_rate(array, threads: int, seconds: float) -> float:
    """Rows/s of the reader's own reading alone: whole chunks in a random order into a block buffer
    (reused, as the reader reuses it), `threads` at a time. On a GPU host this is all the reader does
    on the CPU: the gather and the conversion of a batch run on the device."""
    read = chunk_reader(array)
    rows = array.chunks[0]
    n = math.ceil(array.shape[0] / rows)
    buf = np.empty((n * rows, array.shape[1]), dtype=array.dtype)
    done, start = 0, None
    with ThreadPoolExecutor(threads) as pool:
        while start is None or time.perf_counter() - start < seconds:
            got = sum(pool.map(lambda c: read(int(c), buf[c * rows : (c + 1) * rows]), np.random.permutation(n)))
            if start is None:  # the first pass touches the buffer's pages: left out
                start = time.perf_counter()
            else:
                done += got
    return done / (time.perf_counter() - start)


def trainer(d: int, latents: int, batch: int, device: str, steps: int) -> Trainer:
    """A trainer in its AuxK phase with no latent dead (the step's steady state) and `steps` to go."""
    start = TrainConfig(batch_tokens=batch, device=device).dead_window(latents, 32)
    tcfg = TrainConfig(batch_tokens=batch, tokens=start + steps * batch, device=device, dead_tokens=10**9)
    t = Trainer(SAEConfig(d, latents, 32), tcfg)
    t.initialize(torch.randn(4 * batch, d, device=device))
    t.tokens = start
    return t


def train_rate(t: Trainer, batches, device: str, warmup: int = 3) -> float:
    """Tokens/s of one `train_saes` call (as the train stage makes it) drawing from `batches` until the
    trainer's budget ends, from the step after `warmup` to the last one: the copy of the SAE that
    `train_saes` returns at the end is left out: a cost per run, not per token, that over this
    benchmark's few hundred steps weighed as much as the steps on an H200."""
    marks = []

    def mark():
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), t.tokens))

    def timed():
        for i, batch in enumerate(batches):
            if i == warmup:
                mark()
            if t.done:  # asked for the batch after the last step
                break
            yield batch
        mark()

    train_saes([t], timed(), progress=False)
    (start, tokens), (end, last) = marks[0], marks[-1]
    if hasattr(batches, "close"):
        batches.close()
    return (last - tokens) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", default="576,2304", help="widths, comma-separated")
    parser.add_argument("--tokens", type=int, default=262144, help="training rows in each store")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=4096, help="the SAE trained from memory and from the store")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=6.0, help="each measurement's duration")
    parser.add_argument("--store-dir", help="where the stores are written (default: a temporary folder)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    where = "GPU " + torch.cuda.get_device_name() if args.device == "cuda" else f"{cores} CPU cores"
    print(f"data path on {where}, torch threads {torch.get_num_threads()}, batch {args.batch}", flush=True)
    table = [f"{'d':>5} {'store':<5} {'path':<40} {'rows/s':>10} {'GB/s':>6} {'vs step':>8}"]
    with tempfile.TemporaryDirectory(dir=args.store_dir) as tmp:
        for d in (int(x) for x in args.d.split(",")):
            memory = itertools.cycle(torch.randn(4 * args.batch, d, device=args.device).split(args.batch))
            probe = train_rate(trainer(d, args.latents, args.batch, args.device, 6), memory, args.device)
            # each training measurement: `seconds` long, and at least two of the reader's blocks, so that
            # reading a block ahead (at the start of each) weighs as it does over a whole run
            block_batches = SHUFFLE_BUFFER_MB * 2**20 // (d * 2) // args.batch
            steps = max(10, round(args.seconds * probe / args.batch), 2 * block_batches)
            step = train_rate(trainer(d, args.latents, args.batch, args.device, steps), memory, args.device)
            measured = [("", f"training, in-memory batches ({args.latents} latents)", step)]
            for compression in ("zstd", "none"):
                t0 = time.perf_counter()
                url = build_store(Path(tmp), d, args.tokens, compression)
                acts = store.activations(store.open_store(url, verify=True), "train", HOOK)
                raw = acts.shape[0] * d * 2
                print(
                    f"d {d}, {compression}: {acts.shape[0]:,} rows written in {time.perf_counter() - t0:.0f} s, "
                    f"{on_disk(url) / 2**20:.1f} MiB on disk for {raw / 2**20:.1f} MiB of float16 "
                    f"(ratio {raw / on_disk(url):.4f})",
                    flush=True,
                )

                def reader(readers: int, acts=acts):
                    return reading.prefetch(
                        reading.shuffled_batches(acts, args.batch, seed=0, readers=readers, device=args.device)
                    )

                if compression == "zstd":
                    before = reading.prefetch(reader_before(acts, args.batch))
                    measured.append((compression, "reader before, 1 thread", rate(before, args.seconds, args.device)))
                measured.append(
                    (
                        compression,
                        "sequential read",
                        rate(reading.iter_rows(acts, args.batch), args.seconds, args.device),
                    )
                )
                for n in sorted({1, 2, cores}):
                    name = f"reader, {n} thread{'s' if n > 1 else ''}"
                    measured.append((compression, name, rate(reader(n), args.seconds, args.device)))
                for n in sorted({1, 2, cores}):
                    name = f"its chunk reads alone, {n} thread{'s' if n > 1 else ''}"
                    measured.append((compression, name, block_read_rate(acts, n, args.seconds)))
                # the same batches, in the same order, first from memory, then from the reader
                same = list(
                    itertools.islice(reading.shuffled_batches(acts, args.batch, seed=0, device=args.device), steps)
                )
                t = trainer(d, args.latents, args.batch, args.device, steps)
                measured.append(
                    (compression, "training, its batches in memory", train_rate(t, iter(same), args.device))
                )
                del same
                t = trainer(d, args.latents, args.batch, args.device, steps)
                from_store = train_rate(t, reader(reading.DEFAULT_READERS), args.device)
                measured.append((compression, "training from the store", from_store))
            for compression, name, value in measured:
                gbs = value * d * 2 / 1e9
                table.append(f"{d:>5} {compression:<5} {name:<40} {value:>10,.0f} {gbs:>6.2f} {value / step:>7.2f}x")
            print("\n".join(table[-len(measured) :]), flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
