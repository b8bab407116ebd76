"""Training throughput of the TopK SAE: tokens/s and peak memory per configuration.

Side by side in one run: saeflow's trainer step (sparse encoder backward and sparse decoder), the
same step with a dense masked code (what autograd through `scatter` + matmul costs) and, with
--peers, the training steps of EleutherAI sparsify and SAELens at the same settings (installed into
their own venv, .bench-peers/, on first use). Each measurement runs in its own subprocess so peak
memory is that measurement's alone; speed-ups are against saeflow measured in the same run.

    python benchmarks/train_throughput.py [--steps N] [--device cpu|cuda] [--quick] [--peers]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
PEERS_VENV = HERE.parent / ".bench-peers"
PEER_PACKAGES = ["eai-sparsify==1.3.3", "sae-lens==6.54.12"]

CONFIGS = [  # (d_in, n_latents, k, batch) as in the issue
    (256, 4096, 32, 4096),
    (768, 32768, 32, 4096),
]


def measure(impl: str, d: int, n: int, k: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from sae.config import SAEConfig, TrainConfig
    from sae.train import Trainer

    torch.manual_seed(0)
    tcfg = TrainConfig(batch_tokens=batch, tokens=10**12, device=device, aux_k=min(256, n // 2), dead_tokens=10**9)
    trainer = Trainer(SAEConfig(d, n, k), tcfg)
    data = torch.randn(4 * batch, d, device=device)
    trainer.initialize(data)
    if impl == "dense":
        import sae.train as train_module

        train_module.sae_loss = dense_loss
    x = [data[i * batch : (i + 1) * batch] for i in range(4)]
    trainer.step(x[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(x[i % 4])
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"tokens_per_s": steps * batch / elapsed, "peak_mib": peak}


def dense_loss(sae, x_norm, mse_scale, tcfg, dead):
    """The same loss with a dense (batch, n_latents) code, for comparison only."""
    import torch

    from sae.train import LossParts

    pre = (x_norm - sae.b_pre) @ sae.W_enc.T
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    recon = z @ sae.W_dec + sae.b_pre
    mse = (x_norm - recon).pow(2).sum(-1).mean() * mse_scale
    return LossParts(mse, mse.detach(), torch.zeros(()), top.values.relu().detach(), top.indices)


def peers_python() -> str:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {', '.join(PEER_PACKAGES)} into {PEERS_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel, as for saeflow itself
        subprocess.run(pip + PEER_PACKAGES, check=True)
    return str(python)


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="only the first configuration")
    parser.add_argument("--peers", action="store_true", help="also run EleutherAI sparsify and SAELens")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, d, n, k, batch = args.one.split(",")
        print(json.dumps(measure(impl, int(d), int(n), int(k), int(batch), args.steps, args.device)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peers = peers_python() if args.peers else None
    if peers and device != "cpu":
        raise SystemExit("--peers runs on CPU only (the peers' venv has the CPU torch wheel)")
    print(f"device {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; steps {args.steps}")
    header = f"{'d':>5} {'n_latents':>9} {'k':>3} {'batch':>6} | {'impl':<14} {'tokens/s':>10} {'peak MiB':>9} | {'saeflow is':>10}"
    print(header)
    print("-" * len(header))
    for d, n, k, batch in CONFIGS[:1] if args.quick else CONFIGS:
        results = {}
        for impl in ("saeflow", "dense"):
            results[impl] = run_json([sys.executable, __file__, "--one", f"{impl},{d},{n},{k},{batch}",
                                      "--steps", str(args.steps), "--device", device])
        if peers:
            for impl in ("sparsify", "saelens"):
                results[impl] = run_json([peers, str(HERE / "peers.py"), impl, str(d), str(n), str(k), str(batch),
                                          str(args.steps)])
        ours = results["saeflow"]["tokens_per_s"]
        for impl, r in results.items():
            ratio = "" if impl == "saeflow" else f"{ours / r['tokens_per_s']:.2f}x"
            print(f"{d:>5} {n:>9} {k:>3} {batch:>6} | {impl:<14} {r['tokens_per_s']:>10.0f} {r['peak_mib']:>9.0f} | {ratio:>10}")


if __name__ == "__main__":
    main()
