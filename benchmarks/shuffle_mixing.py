"""How well the train stage's reader shuffles: distinct documents and contexts per batch, drawn in
the reader's order (storage.shuffle.ChunkOrder) against a uniform draw from all rows, for several
shuffle buffers, on a cached store's training split.

    python benchmarks/shuffle_mixing.py [--store DIR] [--batch 1024,4096] [--buffers-mb 16,32,64,128,256]

--store defaults to the demo's store (run `make demo` first). Only the order is computed: no
activation is read.
"""

from __future__ import annotations

import argparse

import numpy as np
from store_codecs import demo_store

from storage import activations as store
from storage import reading
from storage.shuffle import SHUFFLE_BUFFER_MB, ChunkOrder, mixing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="an activation store's root (default: the demo's)")
    parser.add_argument("--batch", default="1024,4096", help="batch sizes in rows, comma-separated")
    parser.add_argument("--buffers-mb", default=f"16,32,64,128,{SHUFFLE_BUFFER_MB}", help="comma-separated")
    parser.add_argument("--batches", type=int, default=40, help="batches averaged over")
    args = parser.parse_args()
    url = args.store or demo_store()
    group = store.open_store(url, verify=True)
    first = group.attrs["first_position"]
    doc_index = np.asarray(group["train/doc_index"][:])[:, first:]
    acts = store.activations(group, "train", group.attrs["hookpoints"][0])
    document = doc_index.reshape(-1)
    context = np.repeat(np.arange(doc_index.shape[0]), doc_index.shape[1])
    store_mb = acts.nbytes / 2**20
    print(
        f"{acts.shape[0]:,} rows of {doc_index.shape[0]:,} contexts from {len(np.unique(document))} documents, "
        f"{store_mb:.0f} MiB in chunks of {acts.chunks[0]} rows, at {url}"
    )
    cols = ("batch", "buffer MiB", "chunks", "documents", "uniform", "ratio", "contexts", "uniform", "ratio")
    print(" ".join(f"{c:>10}" for c in cols))
    for batch in (int(b) for b in args.batch.split(",")):
        for mb in (int(m) for m in args.buffers_mb.split(",")):
            order = ChunkOrder(acts.shape[0], acts.chunks[0], batch, reading.chunks_in(acts, mb), seed=0)
            docs, docs_uniform = mixing(order, document, args.batches)
            ctxs, ctxs_uniform = mixing(order, context, args.batches)
            row = (batch, mb, order.block_chunks, docs, docs_uniform, docs / docs_uniform, ctxs, ctxs_uniform)
            print(" ".join(f"{v:>10}" if isinstance(v, int) else f"{v:>10.3f}" for v in (*row, ctxs / ctxs_uniform)))


if __name__ == "__main__":
    main()
