"""Sparse TopK encoder and decoder: nothing n_latents-wide is materialised after the encoder matmul.

The encoder's forward needs the dense pre-activations (every latent competes for the top k), but its
backward only has gradient at the selected latents, and the decoder only reads k rows per token.
Autograd through a dense masked code would spend two more dense (batch x n_latents x d) matmuls in
the backward; here both backward products are gathers/scatters over the selected rows, which is what
makes TopK training cheap per token (the released code's Triton kernels do the same on GPU).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae.config import FUSED_MAX_K


@functools.cache
def _triton_kernels():
    try:
        from sae import triton_kernels
    except ImportError:  # no triton (CPU installs): the embedding_bag path serves every device
        return None
    return triton_kernels


def _kernels():
    """The Triton kernels, where `_use_triton` chose them (so triton is installed)."""
    module = _triton_kernels()
    if module is None:
        raise RuntimeError("the Triton kernels were chosen, but triton is not installed")
    return module


@dataclass(frozen=True)
class KernelChoice:
    """Which kernels the forward passes below take (TrainConfig.triton / fused_topk set them for a run).

    triton: CUDA tensors use the Triton kernels (where triton is installed); False: PyTorch's
    embedding_bag everywhere, the reference. fused_topk: the bf16 CUDA path runs the encoder matmul
    and the TopK in one Triton kernel. Off by default: on an H100 (batch 4096, k 32) it made the
    d 768 / n 32768 step only 1.04x faster (and 23% lighter), and at d 256 / n 4096 the kernel alone
    took 0.61 ms against 0.31 ms for the bf16 matmul + torch.topk (docs/benchmarks.md)."""

    triton: bool = True
    fused_topk: bool = False


# read by forward passes only: a CUDA backward runs on autograd's own thread, which does not see it,
# so each autograd function keeps its forward's choice for its backward
_CHOICE: ContextVar[KernelChoice] = ContextVar("saeflow_kernels", default=KernelChoice())  # noqa: B039 (frozen)


@contextlib.contextmanager
def using(choice: KernelChoice):
    """Runs the block's forward passes with `choice`."""
    token = _CHOICE.set(choice)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _CHOICE.get().triton and _triton_kernels() is not None


def _use_fused_topk(x: torch.Tensor, k: int) -> bool:
    return (
        _CHOICE.get().fused_topk
        and k <= FUSED_MAX_K
        and _use_triton(x)
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: a (B, d) reconstruction from (B, k) codes."""
    grad = torch.is_grad_enabled() and (W_dec.requires_grad or values.requires_grad)
    if grad and W_dec.requires_grad and _use_triton(W_dec):
        return _TritonSparseDecode.apply(values, indices, W_dec)
    if _on_cpu(W_dec) and not grad:
        return _nonzero_decode(values, indices, W_dec)
    if _on_cpu(W_dec) and W_dec.requires_grad:
        # the values' gradient by embedding_bag's own backward (its weight detached), W_dec's by the
        # sparse product (_DecoderRowGrad): embedding_bag's weight backward is 2.5x slower on CPU
        out = F.embedding_bag(indices, W_dec.detach(), per_sample_weights=values.to(W_dec.dtype), mode="sum")
        return out + _DecoderRowGrad.apply(W_dec, indices, values.detach())
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def _on_cpu(t: torch.Tensor) -> bool:
    """The CPU path: float32/float64 tensors on the CPU (MKL's sparse product takes those)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _nonzero_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """sparse_decode over the code's nonzero entries only, without autograd. Why: AuxK's picks and a
    backward's masked gradients are often half zeros at batches of 1024 (a one-batch dead window
    leaves AuxK aux_k candidates); leaving them out adds the same terms in the same order."""
    keep = values != 0
    return ragged_decode(_entry_rows(indices)[keep.reshape(-1)], indices[keep], values[keep], W, indices.shape[0])


def _entry_rows(indices: torch.Tensor) -> torch.Tensor:
    """Each entry's row of a (B, k) code, flattened (an expand: no host sync)."""
    return torch.arange(indices.shape[0], device=indices.device)[:, None].expand(indices.shape).reshape(-1)


class _DecoderRowGrad(torch.autograd.Function):
    """A zero (B, d) output whose backward is sparse_decode's gradient for W_dec: added to an
    embedding_bag over the detached W_dec, it gives W_dec the sparse product's gradient (scatter_rows)
    and leaves the values' gradient to embedding_bag."""

    @staticmethod
    def forward(ctx, W_dec, indices, values):
        ctx.save_for_backward(indices, values)
        ctx.n_rows = W_dec.shape[0]
        return W_dec.new_zeros(indices.shape[0], W_dec.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        indices, values = ctx.saved_tensors
        return scatter_rows(ctx.n_rows, indices, values, grad_out), None, None


class _TritonSparseDecode(torch.autograd.Function):
    """embedding_bag forward; backward by the Triton kernels instead of embedding_bag's."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _kernels().gather_dot(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(W_dec.shape[0], indices, values, grad_out, triton=True)
        return grad_values, None, grad_W


def scatter_rows(
    n_rows: int,
    indices: torch.Tensor,
    grads: torch.Tensor,
    x: torch.Tensor,
    tokens: torch.Tensor | None = None,
    triton: bool = True,
) -> torch.Tensor:
    """sum over code entries (b, j) of grads[b, j] * outer(e_{indices[b, j]}, x[b]): an (n_rows, d)
    weight gradient, for a (B, k) code or a ragged one (1-D indices/grads with their rows in `tokens`).

    This is exactly the weight gradient of `sparse_decode` for an upstream gradient x. On CUDA a
    Triton kernel computes it; elsewhere PyTorch's embedding_bag backward, which does so without
    materialising the (B*k, d) products. triton=False takes embedding_bag's on CUDA too.
    """
    if triton and x.is_cuda and _triton_kernels() is not None:
        tokens = _entry_rows(indices) if tokens is None else tokens
        return _kernels().segment_rows(n_rows, indices.reshape(-1), grads.reshape(-1).to(x.dtype), tokens, x)
    if _on_cpu(x):
        return _csr_scatter(n_rows, indices, grads, x, tokens)
    offsets = ragged_offsets(tokens, x.shape[0]) if tokens is not None else None
    weight = torch.zeros(n_rows, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(indices, weight, offsets, per_sample_weights=grads.to(x.dtype), mode="sum")
        (grad,) = torch.autograd.grad(out, weight, grad_outputs=x)
    return grad


def _csr_scatter(
    n_rows: int, indices: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor | None
) -> torch.Tensor:
    """scatter_rows on the CPU: the code's nonzero entries as an (n_rows, B) CSR matrix times x, by
    MKL's sparse product: 2.5x faster than embedding_bag's backward at k 32 (batches of 1024-16384,
    d 576, 4096 rows), each row summing its entries in token order as that does (equal to it within
    float32 rounding: tests/test_model.py). Zero entries (AuxK's, a masked backward's) are left out."""
    flat, weights = indices.reshape(-1), grads.reshape(-1).to(x.dtype)
    tokens = _entry_rows(indices) if tokens is None else tokens
    keep = weights != 0
    flat, weights, tokens = flat[keep], weights[keep], tokens[keep]
    order = flat.argsort(stable=True)  # by row; within a row, token order (the entries come by token)
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
    with warnings.catch_warnings():  # PyTorch calls its CSR support beta, once per process
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        product = torch.sparse_csr_tensor(
            crow, tokens[order], weights[order], (n_rows, x.shape[0]), check_invariants=False
        )
    return product @ x


def _pre_activations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b: the one dense product. Under autocast it runs (and is kept) in bf16, which only
    decides which latents win; the kept values are cast back to the parameters' dtype at once so that
    the decoder and every gradient product run in float32."""
    return F.linear(x, W_enc, b_enc)


class TopKEncode(torch.autograd.Function):
    """(values, indices) = ReLU(TopK(x W^T + b)), with an optional second TopK over a masked subset.

    The second selection serves AuxK (§A.2): the top k_aux pre-activations among dead latents, taken
    from the same matmul. Both selections' gradients go back through one sparse scatter.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k: int, aux_k: int, aux_mask, aux_latents):
        if _use_fused_topk(x, k):
            # the (batch x n_latents) pre-activations never reach memory; AuxK multiplies the dead rows only
            bf16 = torch.bfloat16
            values, indices = _kernels().encode_topk(x.to(bf16), W_enc.to(bf16), b_enc, k)
            values = values.to(W_enc.dtype).relu()
            pre = None
        else:
            pre = _pre_activations(x, W_enc, b_enc)
            top = pre.topk(k, dim=-1, sorted=True)
            values, indices = top.values.to(W_enc.dtype).relu(), top.indices
        if aux_k > 0 and (pre is None or aux_latents is not None):
            # the candidates' rows only: a small product (the fused path has no pre-activations to mask)
            dead = aux_latents if aux_latents is not None else aux_mask.nonzero().squeeze(1)
            aux = _pre_activations(x, W_enc[dead], b_enc[dead] if b_enc is not None else None).topk(
                min(aux_k, len(dead)), dim=-1, sorted=False
            )
            # fewer dead latents than aux_k: the rest are zero picks (of latent 0), as the masked path gives
            missing = aux_k - aux.values.shape[1]
            aux_values = F.pad(aux.values.to(W_enc.dtype).relu(), (0, missing))
            aux_indices = F.pad(dead[aux.indices], (0, missing))
        elif aux_k > 0 and pre is not None:
            aux = pre.masked_fill(~aux_mask, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            aux_values, aux_indices = aux.values.to(W_enc.dtype).relu(), aux.indices
        else:
            aux_values = x.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x, W_enc, indices, values, aux_indices, aux_values)
        ctx.has_bias, ctx.triton = b_enc is not None, _use_triton(x)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):
        x, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        idx = torch.cat([indices, aux_indices], dim=1)
        # ReLU: no gradient where the kept value is zero (or -inf from the mask)
        g = torch.cat([grad_values * (values > 0), grad_aux * (aux_values > 0)], dim=1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(g, idx, W_enc)
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(W_enc.shape[0], idx, g, x, triton=ctx.triton)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    k: int,
    aux_k: int = 0,
    aux_mask: torch.Tensor | None = None,
    aux_latents: torch.Tensor | None = None,
):
    """Returns (values, indices, aux_values, aux_indices); values sorted descending per row.

    The second selection picks among the latents of aux_mask, or of aux_latents (their indices)
    when given: then only their rows of W_enc are multiplied, which costs far less than masking
    and selecting over the whole (batch x n_latents) matrix while few latents are candidates."""
    if aux_k > 0 and aux_mask is None and aux_latents is None:
        raise ValueError("aux_k > 0 needs aux_mask or aux_latents (which latents may be picked)")
    return TopKEncode.apply(x, W_enc, b_enc, k, aux_k, aux_mask, aux_latents)


def mask_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The positions of a 1-D mask's `count` True entries, ascending (mask.nonzero() when count is
    right), without a host sync: the caller knows the count."""
    slot = torch.where(mask, mask.long().cumsum(0) - 1, count)  # False entries land in a spare slot
    positions = torch.arange(len(mask), device=mask.device)
    return torch.zeros(count + 1, dtype=torch.long, device=mask.device).scatter_(0, slot, positions)[:count]


class BatchTopKEncode(torch.autograd.Function):
    """BatchTopK (Bussmann et al. 2024): the `count` (= k·B) largest pre-activations of the whole
    batch, so tokens get a variable number of latents averaging k. Returns a ragged code: (rows, cols,
    values) sorted by row, for `embedding_bag` with offsets; the backward touches only the selected
    entries. `keep`, given the candidates' values in descending order, says how many of them to keep:
    on a grid of processes each holding part of a batch, count is the whole batch's and keep compares
    with the threshold found over every process's candidates (sae/parallel.py)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, count: int, keep=None):
        pre = _pre_activations(x, W_enc, b_enc)
        n = W_enc.shape[0]
        top = pre.flatten().topk(min(count, pre.numel()), sorted=keep is not None)
        if keep is not None:
            m = keep(top.values)
            top = top.values[:m], top.indices[:m]
        order = top[1].argsort()  # by row, then column
        flat, values = top[1][order], top[0][order].to(W_enc.dtype).relu()
        rows, cols = flat // n, flat % n
        ctx.save_for_backward(x, W_enc, rows, cols, values)
        ctx.has_bias, ctx.triton = b_enc is not None, _use_triton(x)
        ctx.mark_non_differentiable(rows, cols)
        return rows, cols, values

    @staticmethod
    def backward(ctx, _gr, _gc, grad_values):
        x, W_enc, rows, cols, values = ctx.saved_tensors
        g = grad_values * (values > 0)
        offsets = ragged_offsets(rows, x.shape[0])
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, W_enc, offsets, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(W_enc.shape[0], cols, g, x, rows, triton=ctx.triton)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_x, grad_W, grad_b, None, None


def ragged_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Start of each row's entries in a row-sorted ragged code (rows with no entry get empty bags)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])


def ragged_decode(rows, cols, values, W_dec: torch.Tensor, n_rows: int) -> torch.Tensor:
    return F.embedding_bag(
        cols, W_dec, ragged_offsets(rows, n_rows), per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )
