"""The largest SAE that trains on one GPU: n_latents doubled until a step runs out of memory.

For each d_model, trains saeflow's default step (bf16 on CUDA, batch 4096, k 32) at n_latents =
START, 2*START, ... in a fresh subprocess each, and prints tokens/s and peak GPU memory, or where it
ran out of memory.

    python benchmarks/max_latents.py [--d 768,2304] [--start 131072] [--max 4194304] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one(d: int, n: int, steps: int) -> dict:
    import torch
    from train_throughput import time_steps

    from sae.config import SAEConfig, TrainConfig
    from sae.train import Trainer

    batch = 4096
    trainer = Trainer(
        SAEConfig(d, n, 32),
        TrainConfig(
            batch_tokens=batch, tokens=10**12, device="cuda", dead_tokens=10**9, geometric_median_samples=batch
        ),
    )
    data = torch.randn(2 * batch, d, device="cuda")
    trainer.initialize(data)
    result = time_steps(lambda i: trainer.step(data[(i % 2) * batch : (i % 2 + 1) * batch]), steps, "cuda")
    return {
        "tokens_per_s": result["steps_per_s"] * batch,
        "peak_gib": result["peak_mib"] / 1024,
        "bytes_per_latent": torch.cuda.max_memory_allocated() / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", default="768,2304")
    parser.add_argument("--start", type=int, default=131072)
    parser.add_argument("--max", type=int, default=4194304)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        d, n = map(int, args.one.split(","))
        print(json.dumps(one(d, n, args.steps)))
        return
    import torch

    print(
        f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; "
        f"bf16, batch 4096, k 32, default optimizer"
    )
    print(f"{'d':>5} {'n_latents':>9} | {'tokens/s':>10} {'peak GiB':>8}")
    for d in map(int, args.d.split(",")):
        n = args.start
        while n <= args.max:
            done = subprocess.run(
                [sys.executable, __file__, "--one", f"{d},{n}", "--steps", str(args.steps)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                lines = done.stderr.strip().splitlines() or ["?"]
                # CUDA's errors end in advice; the error's own line and our last frame say what failed
                error = [line for line in lines if "Error" in line] or lines[-1:]
                frame = [line.strip() for line in lines if 'File "' in line and "/sae/" in line][-1:]
                reason = "out of memory" if "out of memory" in done.stderr else " | ".join(error[-1:] + frame)
                print(f"{d:>5} {n:>9} | {reason[:300]}")
                break
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{d:>5} {n:>9} | {r['tokens_per_s']:>10.0f} {r['peak_gib']:>8.1f}", flush=True)
            n *= 2


if __name__ == "__main__":
    main()
