"""Triton kernels for the sparse products of the TopK backward on CUDA.

Why: on an H100 (d 768, 32768 latents, k 32, batch 4096, bf16 autocast) PyTorch's embedding_bag
backward, which the CPU path uses for both weight gradients, took 1.5 ms of a 5.3 ms step (it sorts,
then scatters partial sums, and our use of it also pays for a throw-away forward). Both weight
gradients are the same product, grad[n] = sum over code entries e with latent n of w_e * X[token_e]:
here one sort by latent, then one program per (latent, column block) sums its own segment and writes
its row once. No atomics, so the result does not depend on scheduling: the same inputs give the same
bits. `gather_dot` is the decoder's gradient with respect to the kept values.

Imported only on CUDA (triton is not a CPU dependency).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ENTRIES = 16  # code entries loaded together: a latent that fires on every token still streams


@triton.jit
def _segment_rows_kernel(
    order, starts, tokens, weights, x, out, d, stride_x, stride_out, ENTRIES: tl.constexpr, BLOCK_D: tl.constexpr
):
    latent = tl.program_id(0).to(tl.int64)  # n_rows * d passes 2**31 at 1M latents x 2304
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    start = tl.load(starts + latent)
    end = tl.load(starts + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(start, end, ENTRIES):
        pos = first + tl.arange(0, ENTRIES)
        ok = pos < end
        entry = tl.load(order + pos, mask=ok, other=0)
        token = tl.load(tokens + entry, mask=ok, other=0).to(tl.int64)
        w = tl.load(weights + entry, mask=ok, other=0.0).to(tl.float32)
        rows = tl.load(x + token[:, None] * stride_x + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * rows.to(tl.float32), axis=0)
    tl.store(out + latent * stride_out + cols, acc, mask=col_ok)


def segment_rows(
    n_rows: int, latents: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """(n_rows, d) with row n = sum of weights[e] * x[tokens[e]] over the entries e where latents[e] == n.

    latents, weights, tokens: 1-D, one value per code entry. Rows no entry names come out zero.
    """
    x = x.contiguous()
    # int32 keys: half the radix-sort passes of int64
    sorted_latents, order = latents.int().sort(stable=True)
    starts = torch.searchsorted(sorted_latents, torch.arange(n_rows + 1, device=x.device, dtype=torch.int32))
    out = torch.empty(n_rows, x.shape[1], dtype=x.dtype, device=x.device)
    block_d = min(triton.next_power_of_2(x.shape[1]), 256)
    grid = (n_rows, triton.cdiv(x.shape[1], block_d))
    _segment_rows_kernel[grid](
        order,
        starts,
        tokens.contiguous(),
        weights.contiguous(),
        x,
        out,
        x.shape[1],
        x.stride(0),
        out.stride(0),
        ENTRIES=ENTRIES,
        BLOCK_D=block_d,
        num_warps=2,  # pyright: ignore[reportCallIssue]  (a launch option, not in Triton's stubs)
    )
    return out


@triton.jit
def _gather_dot_kernel(a, indices, w, out, k, d, stride_a, stride_w, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < k
    rows = tl.load(indices + token * k + js, mask=j_ok, other=0).to(tl.int64)  # rows * stride_w passes 2**31
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for first in range(0, d, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        av = tl.load(a + token * stride_a + cols, mask=col_ok, other=0.0).to(tl.float32)
        wv = tl.load(w + rows[:, None] * stride_w + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * av[None, :], axis=1)
    tl.store(out + token * k + js, acc, mask=j_ok)


def gather_dot(
    a: torch.Tensor, indices: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(B, k) with [b, j] = a[b] . w[indices[b, j]], without materialising the (B, k, d) gather;
    accumulated in float32, returned in out_dtype (default: a's dtype)."""
    a, indices, w = a.contiguous(), indices.contiguous(), w.contiguous()
    batch, k = indices.shape
    out = torch.empty(batch, k, dtype=torch.float32, device=a.device)
    block_k = min(triton.next_power_of_2(k), 16)
    grid = (batch, triton.cdiv(k, block_k))
    _gather_dot_kernel[grid](
        a,
        indices,
        w,
        out,
        k,
        a.shape[1],
        a.stride(0),
        w.stride(0),
        BLOCK_K=block_k,
        BLOCK_D=128,
        num_warps=4,  # pyright: ignore[reportCallIssue]  (a launch option, not in Triton's stubs)
    )
    return out.to(out_dtype or a.dtype)


# --- fused encoder + TopK ------------------------------------------------------------------------
# Why: the (batch x n_latents) pre-activation matrix is the largest tensor of a step, and torch.topk
# re-reads it (on an H100 at d 768, n 32768, batch 4096 the top-k took 1.10 ms against 0.32 ms for
# the bf16 matmul). Here each program multiplies a block of rows by a chunk of latents tile by tile,
# keeps every tile's product in registers, and merges the tile's top k into a running top k; only
# k candidates per (row, chunk) reach global memory, and a small torch.topk over the chunks'
# candidates finishes the selection. A candidate is one int32 key, so that sorting keys sorts values
# and carries their latents along: the high half is the float32 pre-activation mapped to an
# order-preserving integer and cut to its top 16 bits (bf16 resolution, the resolution autocast's
# bf16 matmul selects at), the low half the latent's position in its chunk. The kept values are then
# recomputed in float32 from the same bf16 inputs, k dot products per row.

KEY_MIN = tl.constexpr(-(2**31))  # below every key; jit code reads only constexpr globals
MAX_CHUNK = 65536  # a latent's position in its chunk fits the key's low 16 bits


@triton.jit
def _pack(values, local):
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude is smaller
    return ((ordered >> 16) << 16) | local


@triton.jit
def _encode_topk_kernel(
    x,
    w,
    b,
    out,
    n_rows,
    n_latents,
    d,
    stride_x,
    stride_w,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    row_ok = rows < n_rows
    best = tl.full([BLOCK_M, K], KEY_MIN, tl.int32)  # sorted descending
    for local in range(0, CHUNK, BLOCK_N):
        cols = chunk.to(tl.int64) * CHUNK + local + tl.arange(0, BLOCK_N)  # cols * stride_w passes 2**31
        col_ok = cols < n_latents
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            xb = tl.load(x + rows[:, None] * stride_x + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wb = tl.load(w + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(xb, tl.trans(wb), acc)
        if HAS_BIAS:
            acc += tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        keys = tl.where(col_ok[None, :], _pack(acc, local + tl.arange(0, BLOCK_N)[None, :]), KEY_MIN)
        # best is descending and the tile's top k flipped is ascending: their elementwise max is the
        # top k of both (a bitonic sequence), which one bitonic merge sorts again
        top = tl.topk(keys, K)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), descending=True)  # pyright: ignore[reportArgumentType]
    ks = tl.arange(0, K)
    n_chunks = tl.num_programs(1)
    tl.store(out + (rows[:, None] * n_chunks + chunk) * K + ks[None, :], best, mask=row_ok[:, None])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _interpreting():  # one small config: the interpreter runs on the CPU, for the correctness tests
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=16))]
    return [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=bd), num_warps=wp, num_stages=st)
        # the configs that ptxas compiles for sm_90 without register spills (or nearly)
        for m, n, bd, wp, st in [
            (64, 128, 64, 8, 3),
            (128, 64, 64, 8, 3),
            (32, 128, 64, 8, 3),
            (64, 64, 64, 8, 3),
            (128, 128, 32, 16, 4),
            (64, 128, 64, 16, 3),
        ]
    ]


_encode_topk = triton.autotune(configs=_configs(), key=["n_latents", "d", "K", "CHUNK", "HAS_BIAS"])(
    _encode_topk_kernel
)


def encode_topk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of x @ w.T + b, selected at bf16
    resolution (ties within it broken by latent), values in float32 sorted descending.

    x: (B, d), w: (n, d) in one dtype (bf16 on the fast path); k <= n.
    """
    x, w = x.contiguous(), w.contiguous()
    n_rows, d = x.shape
    n_latents = w.shape[0]
    K = max(triton.next_power_of_2(k), 2)
    # chunks of latents per program: enough programs to fill the GPU, few candidates per row
    chunk = 32 if _interpreting() else min(4096, max(512, triton.next_power_of_2(n_latents // 16)))
    chunk = min(max(chunk, K), MAX_CHUNK)
    n_chunks = triton.cdiv(n_latents, chunk)
    cand = torch.empty(n_rows, n_chunks * K, dtype=torch.int32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), n_chunks)

    _encode_topk[grid](
        x,
        w,
        b if b is not None else w,
        cand,
        n_rows,
        n_latents,
        d,
        x.stride(0),
        w.stride(0),
        HAS_BIAS=b is not None,
        K=K,
        CHUNK=chunk,
    )
    keys, pos = cand.topk(k, dim=1, sorted=True)
    indices = (pos // K) * chunk + (keys & 0xFFFF).long()
    values = gather_dot(x, indices, w, out_dtype=torch.float32)
    if b is not None:
        values += b.float()[indices]
    # the keys' order is the values' order up to bf16 ties: sort again so that values descend exactly
    values, order = values.sort(dim=1, descending=True)
    return values, indices.gather(1, order)
