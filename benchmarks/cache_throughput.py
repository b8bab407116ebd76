"""Activation caching and loading throughput, each against what it must keep up with.

1. Caching (plan + every shard: forward, encode, compress, write, crc32 marker, Dask statistics)
   against the bare truncated forward of the same model on the same batches.
2. The training loader (shuffled chunks + prefetch thread) against the trainer's consumption at the
   benchmark sizes of train_throughput.py.

    python benchmarks/cache_throughput.py [--model builtin:smollm2-135m] [--contexts 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import CONFIGS, measure  # noqa: E402

from sae.lm import capture, load_lm  # noqa: E402
from storage import activations as store  # noqa: E402
from storage import (
    reading,  # noqa: E402
    shard_writer,  # noqa: E402
)
from storage.corpus import PYTHON_DOCS, split_contexts  # noqa: E402
from storage.layout import TARGET_CHUNK_BYTES  # noqa: E402


def caching(model_source: str, hookpoint: str, n_contexts: int, batch_contexts: int, workdir: Path) -> None:
    model, tok = load_lm(model_source, "auto", "auto", workdir / "model")
    train, _ = split_contexts(PYTHON_DOCS, tok, 64, n_contexts, 1, 0.1)
    ids = torch.from_numpy(train.tokens).long()

    def bare_forward() -> float:
        start = time.perf_counter()
        for b in range(0, n_contexts, batch_contexts):
            capture(model, ids[b : b + batch_contexts], [hookpoint])
        return time.perf_counter() - start

    capture(model, ids[:batch_contexts], [hookpoint])  # warm-up
    before = bare_forward()

    url = str(workdir / "store")
    start = time.perf_counter()
    store.plan_store(
        url,
        {"train": train},
        [hookpoint],
        d_model=model.config.hidden_size,
        first_position=1,
        attrs={},
        shard_contexts=batch_contexts * 2,
    )
    for split, i in store.missing_shards(url):
        shard_writer.write_shard(url, split, i, model, batch_contexts)
    store.finalize_store(url)
    cached = time.perf_counter() - start
    bare = (before + bare_forward()) / 2  # before and after: the machine's speed drifts
    tokens = n_contexts * 63
    print(f"\ncaching {model_source} at {hookpoint}, {n_contexts} contexts x 64 tokens, batches of {batch_contexts}")
    print(f"{'':<34}{'tokens/s':>10}")
    print(f"{'bare truncated forward':<34}{tokens / bare:>10.0f}")
    print(f"{'saeflow caching (whole stage)':<34}{tokens / cached:>10.0f}   {bare / cached:.0%} of the bare forward")


def loading(workdir: Path, rows: int, train_steps: int) -> None:
    print("\nloader (float16 store, shuffle buffer of 8 chunks, prefetch thread) vs trainer consumption")
    print(f"{'d':>5} {'n_latents':>9} {'batch':>6} | {'loader tok/s':>12} {'trainer tok/s':>13} | {'ratio':>6}")
    for d, n, k, batch in CONFIGS:
        data = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float16)
        arr = zarr.create_array(
            str(workdir / f"load-{d}"),
            shape=data.shape,
            dtype="float16",
            chunks=(TARGET_CHUNK_BYTES // (2 * d), d),
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        )
        arr[:] = data
        it = reading.prefetch(reading.shuffled_batches(arr, batch, seed=0))
        next(it)
        n_batches = rows // batch
        start = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        loader = n_batches * batch / (time.perf_counter() - start)
        trainer = measure("saeflow", d, n, k, batch, train_steps, "cpu")["tokens_per_s"]
        print(f"{d:>5} {n:>9} {batch:>6} | {loader:>12.0f} {trainer:>13.0f} | {loader / trainer:>5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--hookpoint", default="model.layers.20")
    parser.add_argument("--contexts", type=int, default=256)
    parser.add_argument("--batch-contexts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        caching(args.model, args.hookpoint, args.contexts, args.batch_contexts, Path(tmp))
        loading(Path(tmp), args.rows, args.train_steps)


if __name__ == "__main__":
    main()
