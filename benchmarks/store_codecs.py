"""What the activation store's compression buys and costs on real activations: the stored size and
the decode rate of each `data.compression` choice, on a copy of a cached store's training array.

    python benchmarks/store_codecs.py [--store DIR] [--hookpoint NAME] [--rows 100000] [--seconds 4]

--store defaults to the demo's store (run `make demo` first). Every choice is written with the
store's own chunk and shard layout into a temporary folder, in the array's dtype and in bfloat16
(its raw bits, as the store keeps bfloat16), then read back whole chunks at a time, as the
train stage's reader does, with 1 and with all reader threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from storage import activations as store
from storage import reading


def demo_store() -> str:
    found = sorted(Path(".saeflow/activations").glob("*/zarr.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no store under .saeflow/activations: run `make demo`, or pass --store DIR")
    return str(found[-1].parent)


def read_rate(array: zarr.Array, readers: int, seconds: float) -> float:
    """Rows/s reading and decoding whole chunks in a shuffled order, `readers` at a time."""
    rows = array.chunks[0]
    order = np.random.default_rng(0).permutation(-(-array.shape[0] // rows))
    done, start = 0, time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        while time.perf_counter() - start < seconds:
            for block in pool.map(lambda c: array[c * rows : (c + 1) * rows], order):
                done += len(block)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="an activation store's root (default: the demo's)")
    parser.add_argument("--hookpoint", help="default: the store's first")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the training array to copy")
    parser.add_argument("--seconds", type=float, default=4.0, help="each read measurement's duration")
    args = parser.parse_args()
    url = args.store or demo_store()
    group = store.open_store(url, verify=True)
    hookpoint = args.hookpoint or group.attrs["hookpoints"][0]
    source = store.activations(group, "train", hookpoint)
    rows = min(args.rows, source.shape[0])
    x = reading.stored_rows(source, 0, rows)
    cores = os.cpu_count() or 1
    print(f"{rows:,} rows x {source.shape[1]} of {hookpoint} from {url}; {cores} cores", flush=True)
    print(
        f"{'dtype':<9} {'compression':<12} {'ratio':>7} {'write MB/s':>10} {'rows/s, 1':>10} {f'rows/s, {cores}':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, values in (
            ("float16", x.half().numpy()),
            ("bfloat16", x.float().bfloat16().view(torch.uint16).numpy()),
        ):
            for name in store.COMPRESSIONS:
                path = Path(tmp) / f"{dtype}-{name}"
                array = zarr.create_array(
                    str(path),
                    shape=values.shape,
                    dtype=values.dtype,
                    chunks=source.chunks,
                    shards=source.shards,
                    compressors=store.compressors(name),
                )
                t0 = time.perf_counter()
                array[:] = values
                write = values.nbytes / (time.perf_counter() - t0) / 1e6
                size = sum(f.stat().st_size for f in path.rglob("c/**/*") if f.is_file())
                one, many = (read_rate(array, n, args.seconds) for n in (1, cores))
                print(
                    f"{dtype:<9} {name:<12} {values.nbytes / size:>7.4f} {write:>10,.0f} {one:>10,.0f} {many:>10,.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
