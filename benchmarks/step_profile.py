"""Where one training step's time goes: a torch.profiler table of the trainer step, then its main
operations on their own: the encoder matmul, the top-k selection, on CUDA in bf16 both at once by the
fused kernel, and one weight gradient by
embedding_bag's backward (the CPU path) and by the Triton kernel (CUDA).

    python benchmarks/step_profile.py [--device cpu|cuda] [--precision auto|fp32|bf16]
                                      [--d 768 --n 32768 --k 32 --batch 4096]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sae.config import SAEConfig, TrainConfig
from sae.kernels import scatter_rows
from sae.train import Trainer


def bench(fn, device: str, repeat: int = 20) -> float:
    """Median milliseconds of fn() after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device, batch = args.device, args.batch

    tcfg = TrainConfig(batch_tokens=batch, tokens=10**12, device=device, precision=args.precision, dead_tokens=10**9)
    trainer = Trainer(SAEConfig(args.d, args.n, args.k), tcfg)
    data = torch.randn(4 * batch, args.d, device=device)
    trainer.initialize(data)
    xs = [data[i * batch : (i + 1) * batch] for i in range(4)]
    step_ms = bench(lambda: trainer.step(xs[0]), device, repeat=10)
    print(
        f"device {device}; precision {args.precision} (bf16 autocast: {tcfg.bf16()}); "
        f"d {args.d} n {args.n} k {args.k} batch {batch}: {step_ms:.2f} ms/step, "
        f"{batch / step_ms * 1e3:,.0f} tokens/s"
    )

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(5):
            trainer.step(xs[i % 4])
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))

    dtype = torch.bfloat16 if tcfg.bf16() else torch.float32
    pre = torch.randn(batch, args.n, device=device, dtype=dtype)
    x = xs[0].to(dtype)
    w = trainer.sae.W_enc.detach().to(dtype)
    top = pre.topk(args.k, dim=-1)
    grads = torch.randn(batch, args.k, device=device)

    def weight_grad(triton: bool):
        def run():
            return scatter_rows(args.n, top.indices, grads, xs[0], triton=triton)

        return run

    rows = [
        (f"encoder matmul x W^T ({str(dtype)[6:]})", lambda: x @ w.T),
        ("topk of the pre-activations", lambda: pre.topk(args.k, dim=-1)),
    ]
    if device == "cuda" and dtype == torch.bfloat16:
        from sae.triton_kernels import encode_topk

        rows.append(("fused encoder + topk (Triton)", lambda: encode_topk(x, w, None, args.k)))
    rows.append(("weight gradient, embedding_bag", weight_grad(False)))
    if device == "cuda":
        rows.append(("weight gradient, Triton", weight_grad(True)))
    print(f"{'op (batch ' + str(batch) + ', n ' + str(args.n) + ')':<40} {'ms':>8}")
    for name, fn in rows:
        print(f"{name:<40} {bench(fn, device):>8.3f}")


if __name__ == "__main__":
    main()
