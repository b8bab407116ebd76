"""The train stage's input path, end to end: rows/s and GB/s from an activation store on disk, written
by the store's own writer, through exactly what the train stage runs (shuffled batches, the prefetch
thread, the copy to the device), next to a plain sequential read of the same array and the in-memory
training step on batches of the same size, in one run.

    python benchmarks/data_path.py [--d 576,2304] [--tokens 262144] [--batch 4096] [--latents 4096]
                                   [--device cpu|cuda] [--seconds 8] [--store-dir DIR]

The store's activations come from a stand-in LM (an embedding plus per-token noise, so that the
rows are as incompressible as real activations: the demo store compresses by 1.0004) run through
`storage.activations.write_shard`, as `saeflow cache` runs a real model. The train path is measured
with 1, 2 and as many reader threads as there are cores (`shuffled_batches(readers=...)`).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer
from storage import activations as store
from storage.corpus import Contexts

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


def build_store(root: Path, d: int, tokens: int) -> str:
    """A finished store of `tokens` training rows at width d, written by the store's writer."""
    url = str(root / f"d{d}")
    n = math.ceil(tokens / (CONTEXT - 1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (n, CONTEXT), dtype=np.int32)
    docs = np.repeat(np.arange(n, dtype=np.int32)[:, None], CONTEXT, axis=1)
    positions = np.tile(np.arange(CONTEXT, dtype=np.int32), (n, 1))
    contexts = Contexts(ids, docs, positions, [f"doc-{i}" for i in range(n)])
    store.plan_store(url, {"train": contexts}, [HOOK], d_model=d, first_position=1, attrs={"spec_hash": "bench"})
    model = StandIn(d).eval()
    with torch.no_grad():
        for split, index in store.missing_shards(url):
            store.write_shard(url, split, index, model, batch_contexts=64)
    store.finalize_store(url)
    return url


def on_disk(url: str) -> int:
    return sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file() and "/acts/" in str(f))


def rate(batches, seconds: float, device: str) -> tuple[float, int]:
    """Rows per second drawn from `batches` (each copied to the device) over about `seconds`."""
    rows, start = 0, time.perf_counter()
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        rows += batch.shape[0]
        if time.perf_counter() - start >= seconds:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - start), rows


def step_rate(d: int, latents: int, batch: int, device: str, seconds: float) -> float:
    """Tokens/s of the training step on in-memory batches (in the AuxK phase with none dead)."""
    tcfg = TrainConfig(batch_tokens=batch, tokens=10**12, device=device, dead_tokens=10**9)
    trainer = Trainer(SAEConfig(d, latents, 32), tcfg)
    data = torch.randn(4 * batch, d, device=device)
    trainer.initialize(data)
    trainer.tokens = tcfg.dead_window(latents, 32)
    xs = data.split(batch)
    for i in range(3):
        trainer.step(xs[i % 4])
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.step(xs[steps % 4])
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", default="576,2304", help="widths, comma-separated")
    parser.add_argument("--tokens", type=int, default=262144, help="training rows in each store")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=4096, help="the in-memory step's SAE size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=8.0, help="each measurement's duration")
    parser.add_argument("--store-dir", help="where the stores are written (default: a temporary folder)")
    args = parser.parse_args()
    where = "GPU " + torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"data path on {where}, torch threads {torch.get_num_threads()}, batch {args.batch}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.store_dir) as tmp:
        header = f"{'d':>5} {'path':<34} {'rows/s':>10} {'GB/s':>6} {'vs step':>8}"
        rows_out = []
        for d in (int(x) for x in args.d.split(",")):
            t0 = time.perf_counter()
            url = build_store(Path(tmp), d, args.tokens)
            acts = store.activations(store.open_store(url, verify=True), "train", HOOK)
            raw = acts.shape[0] * d * 2
            print(
                f"d {d}: store of {acts.shape[0]:,} rows written in {time.perf_counter() - t0:.0f} s, "
                f"{on_disk(url) / 2**20:.1f} MiB on disk for {raw / 2**20:.1f} MiB of float16 "
                f"(ratio {raw / on_disk(url):.4f})",
                flush=True,
            )
            step = step_rate(d, args.latents, args.batch, args.device, args.seconds)
            sequential = rate(store.iter_rows(acts, args.batch), args.seconds, args.device)[0]
            paths = [
                (
                    f"train path, {readers} reader thread{'s' if readers > 1 else ''}",
                    rate(
                        store.prefetch(store.shuffled_batches(acts, args.batch, seed=0, readers=readers)),
                        args.seconds,
                        args.device,
                    )[0],
                )
                for readers in sorted({1, 2, os.cpu_count() or 1})
            ]
            for name, value in (
                (f"training step ({args.latents} latents)", step),
                ("sequential read + decode", sequential),
                *paths,
            ):
                rows_out.append(f"{d:>5} {name:<34} {value:>10,.0f} {value * d * 2 / 1e9:>6.2f} {value / step:>7.2f}x")
        print(header)
        print("\n".join(rows_out))


if __name__ == "__main__":
    main()
