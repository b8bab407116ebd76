"""The Triton kernels against float64 references: compiled on a GPU, under Triton's interpreter on a
CPU (conftest sets TRITON_INTERPRET=1 there), so CI checks the kernels' arithmetic without a GPU.

The interpreter's bf16 matmul is wrong (it multiplies the raw bits), so on the CPU the fused
encoder runs on float32 inputs; the kernel is the same for both dtypes, and bf16 runs on the GPU.
"""

import pytest
import torch

from sae.config import SAEConfig, TrainConfig
from sae.train import Trainer

triton_kernels = pytest.importorskip("sae.triton_kernels", reason="triton is not installed")
triton_optim = pytest.importorskip("sae.triton_optim", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_segment_rows_kernel_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    n, d, entries, batch = 300, 200, 5000, 700
    latents = torch.randint(0, n, (entries,), generator=g)
    latents[::2] = 7  # one latent fires on half the entries (a long segment); others stay empty
    latents[latents == 11] = 12
    tokens = torch.randint(0, batch, (entries,), generator=g)
    weights = torch.randn(entries, generator=g)
    x = torch.randn(batch, d, generator=g)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(0, latents, weights.double()[:, None] * x.double()[tokens])
    args = [t.to(DEVICE) for t in (latents, weights, tokens, x)]
    out = triton_kernels.segment_rows(n, *args)
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-6
    assert (out[11] == 0).all()
    assert torch.equal(out, triton_kernels.segment_rows(n, *args))  # no atomics: same bits again


def test_gather_dot_kernel_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    a, w = torch.randn(100, 300, generator=g), torch.randn(500, 300, generator=g)
    idx = torch.randint(0, 500, (100, 37), generator=g)
    ref = torch.einsum("bd,bkd->bk", a.double(), w.double()[idx])
    out = triton_kernels.gather_dot(a.to(DEVICE), idx.to(DEVICE), w.to(DEVICE))
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-6


def check_top_k(x, w, b, k, values, indices, tol):
    """values/indices are a top k of x w^T + b (float64 reference): each kept value is its latent's
    pre-activation up to `tol`, values descend, no latent twice, and nothing left out beats the k-th
    kept by more than bf16's resolution (the kernel selects at it)."""
    pre = (x.double() @ w.double().T + (b.double() if b is not None else 0)).cpu()
    values, indices = values.cpu().double(), indices.cpu().long()
    assert values.shape == indices.shape == (x.shape[0], k)
    assert (values - pre.gather(1, indices)).abs().max().item() < tol
    assert (values[:, 1:] <= values[:, :-1]).all()
    assert all(len(set(row)) == k for row in indices.tolist())
    left_out = pre.scatter(1, indices, float("-inf")).max(dim=1).values
    assert (left_out <= values[:, -1] + tol + values[:, -1].abs() * 2**-7).all()
    exact = pre.topk(k, dim=1)
    return (torch.sort(exact.indices, 1).values == torch.sort(indices, 1).values).float().mean().item()


@pytest.mark.parametrize("rows, n, d, k, bias", [(40, 300, 50, 8, False), (33, 200, 40, 20, True)])
def test_fused_encoder_topk_matches_float64_reference(rows, n, d, k, bias):
    """Row counts and latent counts that fill no block evenly, k not a power of two, with and without bias."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, d, generator=g), torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    values, indices = triton_kernels.encode_topk(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None, k)
    # float32 inputs (tf32 products on the GPU); selection at bf16 resolution: nearly the float64 set
    assert check_top_k(x, w, b, k, values, indices, tol=0.05 if DEVICE == "cuda" else 1e-4) > 0.95


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of selected latents two (B, k) selections share."""
    a, b = torch.sort(a.cpu(), 1).values, torch.sort(b.cpu(), 1).values
    return sum(len(set(r) & set(s)) for r, s in zip(a.tolist(), b.tolist())) / a.numel()


@needs_cuda
def test_fused_encoder_topk_bf16_at_training_size():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 768, generator=g), torch.randn(8192, 768, generator=g) / 28
    b = torch.randn(8192, generator=g) / 10
    xb, wb = x.bfloat16().cuda(), w.bfloat16().cuda()
    values, indices = triton_kernels.encode_topk(xb, wb, b.cuda(), 32)
    # against the float64 products of the same bf16-rounded inputs: float32 accumulation error only
    check_top_k(xb.float(), wb.float(), b.cuda(), 32, values, indices, tol=1e-4)
    # as close to the exact selection as autocast's bf16 matmul + torch.topk
    exact = (xb.double() @ wb.double().T + b.cuda().double()).topk(32).indices
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unfused = torch.nn.functional.linear(xb, wb, b.cuda()).topk(32).indices
    assert agreement(indices, exact) >= agreement(unfused, exact) - 0.01
    again = triton_kernels.encode_topk(xb, wb, b.cuda(), 32)
    assert torch.equal(values, again[0]) and torch.equal(indices, again[1])  # deterministic


@needs_cuda
def test_fused_training_steps_track_float32_as_well_as_the_unfused_bf16_path():
    """Ten steps with AuxK active: the fused bf16 run stays as close to the float32 run as the unfused
    bf16 run does (both select at bf16 resolution; ties go different ways)."""
    x = torch.randn(10 * 1024, 512, generator=torch.Generator().manual_seed(0))
    weights, losses = {}, {}
    for name, precision, fused in [("fp32", "fp32", False), ("unfused", "bf16", False), ("fused", "bf16", True)]:
        trainer = Trainer(
            SAEConfig(512, 4096, 32),
            TrainConfig(
                batch_tokens=1024,
                tokens=10 * 1024,
                device="cuda",
                dead_tokens=1024,
                aux_k=64,
                optimizer="adam",
                lr=1e-3,
                precision=precision,
                fused_topk=fused,
            ),
        )
        trainer.initialize(x)
        losses[name] = [trainer.step(x[i * 1024 : (i + 1) * 1024]).loss.item() for i in range(10)]
        weights[name] = {n: p.detach().clone() for n, p in trainer.sae.named_parameters()}

    def distance(run, n):
        return ((weights[run][n] - weights["fp32"][n]).norm() / weights["fp32"][n].norm()).item()

    for n in weights["fp32"]:
        assert distance("fused", n) <= 1.5 * distance("unfused", n) + 1e-3, (
            n,
            distance("fused", n),
            distance("unfused", n),
        )
    # the losses too, as close as the unfused bf16 run's (an absolute bound failed on the H100 where
    # AuxK starts: few dead latents, picked at bf16 resolution, make both bf16 runs' AuxK terms move)
    for a, unfused, fused in zip(losses["fp32"], losses["unfused"], losses["fused"]):
        assert abs(fused - a) <= 2 * abs(unfused - a) + 0.005 * abs(a), losses


def test_sign_free_step_kernel_matches_the_foreach_step():
    """Three schedule-free sign steps at changing lr: the one-pass kernel against the optimizer's
    foreach form, on a unit-row matrix (its gradient projected) and on a vector that fills no row
    evenly, zero gradients included."""
    from sae import optim

    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 37, generator=g)
    start = [w / w.norm(dim=1, keepdim=True), torch.randn(1500, generator=g)]
    grads = [
        [torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) > 0.2) for t in start] for _ in range(3)
    ]
    lrs = [0.05, 0.02, 0.03]

    ref = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
    # the reference: the foreach form on any device
    opt = optim.ScheduleFreeSignSGD(
        [{"params": ref[:1], "unit_rows": True, "project_rows": True}, {"params": ref[1:]}],
        lr=1.0,
        momentum=0.9,
        triton=False,
    )
    for lr, gs in zip(lrs, grads):
        for p, gr in zip(ref, gs):
            p.grad = gr.clone().to(DEVICE)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
    zs = [p.detach().clone() for p in params]
    weight_sum = 0.0
    for lr, gs in zip(lrs, grads):
        weight_sum += lr * lr
        for i, (p, gr) in enumerate(zip(params, gs)):
            p.grad = gr.clone().to(DEVICE)
            with torch.no_grad():
                hyper = torch.tensor([lr, lr * lr / weight_sum], device=DEVICE)
                triton_optim.sign_free_step(p, zs[i], hyper, 0.9, unit_rows=i == 0, project=i == 0)
    for i, p in enumerate(params):
        assert torch.allclose(p, ref[i], atol=1e-6), i
        assert torch.allclose(zs[i], opt.state[ref[i]]["z"], atol=1e-6), i
    assert torch.allclose(zs[0].norm(dim=1), torch.ones(50, device=DEVICE), atol=1e-6)
    if DEVICE == "cuda":
        assert optim._fused(ref)  # the optimizer takes the kernel on CUDA by default


@needs_cuda
def test_kernels_address_weights_past_two_to_the_31_elements():
    """1M latents at d 2304 hold 2.4e9 weights: the kernels' row offsets must not wrap at int32."""
    d, k, batch = 2048, 8, 4
    n = 2**31 // d + 64  # the last rows start past 2**31 elements
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.zeros(n, d, dtype=torch.bfloat16, device="cuda")
    far = torch.arange(n - 40, n, device="cuda")
    w[far] = torch.randn(len(far), d, generator=g, device="cuda").bfloat16()
    a = torch.randn(batch, d, generator=g, device="cuda").bfloat16()
    indices = far[torch.randint(len(far), (batch, k), generator=g, device="cuda")]
    want = (a.float()[:, None, :] * w[indices].float()).sum(-1)
    assert torch.allclose(triton_kernels.gather_dot(a, indices, w, torch.float32), want, rtol=1e-4, atol=1e-3)
    del w
    weights = torch.randn(batch * k, generator=g, device="cuda")
    tokens = torch.arange(batch, device="cuda").repeat_interleave(k)
    rows = triton_kernels.segment_rows(n, indices.flatten(), weights, tokens, a)
    want = torch.zeros(len(far), d, device="cuda").index_add_(
        0, indices.flatten() - far[0], weights[:, None] * a.float()[tokens]
    )
    assert torch.allclose(rows[far].float(), want, rtol=2e-2, atol=2e-2)
    assert not rows[: n - 40].any()
