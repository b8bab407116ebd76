"""Training throughput of the TopK SAE: tokens/s and peak memory per configuration.

Side by side in one run: saeflow's trainer step with its defaults (sparse encoder backward and
sparse decoder; on CUDA replayed as a CUDA graph where that gains); on the CPU the same step with a
dense masked code (what autograd through `scatter` + matmul costs); on CUDA saeflow's eager step
(saeflow-eager), with Adam (saeflow-adam) and, in bf16, with the fused encoder + TopK kernel in
place of the bf16 matmul and torch.topk (saeflow-fused); on the CPU saeflow-eb, embedding_bag's
backward in place of the CSR product (the CPU path before it); `--impls` picks others (saeflow-eb:
embedding_bag's backward in place of the Triton kernels; saeflow-foreach: the optimizer's foreach
passes in place of its one-pass kernel; saeflow-graph: always a CUDA graph, train.cuda_graph).
With --peers, the training steps of EleutherAI sparsify and SAELens at the same settings (installed
into their own venv, .bench-peers/, on first use, or taken from --peers-python; `--peer-impls
sparsify` runs one). Each measurement runs in its own subprocess so peak memory is that
measurement's alone; speed-ups are against saeflow measured in the same run at the same precision.
On CUDA every implementation runs in float32 and under bf16 autocast (saeflow's default there).

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


def measure(impl: str, precision: str, d: int, n: int, k: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from sae.config import SAEConfig, TrainConfig
    from sae.train import Trainer

    if impl == "saeflow-foreach":  # the optimizer's foreach passes instead of its one-pass Triton kernel
        import sae.optim

        sae.optim._fused = lambda params, triton=True: False
    if impl == "saeflow-eb" and device == "cpu":  # embedding_bag's backward instead of the CSR product
        import sae.kernels

        sae.kernels._on_cpu = lambda t: False
    torch.manual_seed(0)
    tcfg = TrainConfig(
        batch_tokens=batch,
        tokens=10**12,
        device=device,
        aux_k=min(256, n // 2),
        dead_tokens=10**9,
        precision=precision,
        optimizer="adam" if impl == "saeflow-adam" else None,
        # unset (the default: a graph where the step can be captured and is small) but for these two
        cuda_graph={"saeflow-graph": True, "saeflow-eager": False}.get(impl),
        # embedding_bag's backward and the foreach optimizer instead of the Triton kernels
        triton=impl != "saeflow-eb",
        # the fused encoder + TopK kernel instead of the bf16 matmul and torch.topk
        fused_topk=impl == "saeflow-fused",
    )
    trainer = Trainer(SAEConfig(d, n, k), tcfg)
    data = torch.randn(4 * batch, d, device=device)
    trainer.initialize(data)
    # in the AuxK phase with no latent dead, as the peers' runs: the step counts the dead latents
    # (a host sync, as sparsify's) and skips AuxK
    trainer.tokens = tcfg.dead_tokens
    if impl == "dense":
        import sae.train as train_module

        train_module.sae_loss = dense_loss
    x = [data[i * batch : (i + 1) * batch] for i in range(4)]
    return time_steps(lambda i: trainer.step(x[i % 4]), steps, device)


def time_steps(step, steps: int, device: str) -> dict:
    """Steps per second over `steps` calls after four warm-up calls (a CUDA graph is captured in the
    third); peak memory of the device (or process)."""
    import torch

    for i in range(4):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"steps_per_s": steps / elapsed, "peak_mib": peak}


def dense_loss(sae, x_norm, mse_scale, tcfg, dead=None, latents=None, target=None):
    """The same loss with a dense (batch, n_latents) code, for comparison only (an SAE's: no target)."""
    import torch

    from sae.loss import LossParts

    pre = (x_norm - sae.b_pre) @ sae.W_enc.T
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    recon = z @ sae.W_dec + sae.b_pre
    mse = (x_norm - recon).pow(2).sum(-1).mean() * mse_scale
    return LossParts(mse, mse.detach(), torch.zeros(()), top.values.relu().detach(), top.indices)


def default_impls(device: str, precision: str) -> tuple[str, ...]:
    """saeflow's default step first (the ratios are against it), then the variants worth comparing."""
    if device != "cuda":
        return ("saeflow", "saeflow-eb", "dense")
    if precision == "bf16":
        return ("saeflow", "saeflow-eager", "saeflow-foreach", "saeflow-fused", "saeflow-adam")
    return ("saeflow", "saeflow-eager", "saeflow-foreach", "saeflow-adam")


def peers_python(given: str | None) -> str:
    if given:
        return given
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {', '.join(PEER_PACKAGES)} into {PEERS_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel, as for saeflow itself
        subprocess.run(pip + PEER_PACKAGES, check=True)
    return str(python)


def run_json(cmd: list[str]) -> dict:
    """The measurement's JSON line, or its last error line when it failed (a peer not installed)."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="only the first configuration")
    parser.add_argument("--peers", action="store_true", help="also run EleutherAI sparsify and SAELens")
    parser.add_argument("--precisions", help="fp32,bf16 (default: both on CUDA, fp32 on CPU)")
    parser.add_argument("--peer-impls", default="sparsify,saelens")
    parser.add_argument("--peers-python", help="an interpreter that already has the peers (default: .bench-peers)")
    parser.add_argument(
        "--impls",
        help="saeflow's variants to run (default: by device and precision), e.g. "
        "saeflow,saeflow-adam,saeflow-fused,saeflow-eb,dense",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, precision, d, n, k, batch = args.one.split(",")
        result = measure(impl, precision, int(d), int(n), int(k), int(batch), args.steps, args.device)
        print(json.dumps(result))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peers = peers_python(args.peers_python) if args.peers else None
    precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({name}); torch {torch.__version__}; steps {args.steps}")
    header = (
        f"{'d':>5} {'n_latents':>9} {'k':>3} {'batch':>6} {'prec':>4} | {'impl':<10} {'tokens/s':>10} "
        f"{'peak MiB':>9} | {'saeflow is':>10}"
    )
    print(header)
    print("-" * len(header))
    for d, n, k, batch in CONFIGS[:1] if args.quick else CONFIGS:
        for precision in precisions:
            setting = f"{precision},{d},{n},{k},{batch}"
            results = {}
            for impl in args.impls.split(",") if args.impls else default_impls(device, precision):
                results[impl] = run_json(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        f"{impl},{setting}",
                        "--steps",
                        str(args.steps),
                        "--device",
                        device,
                    ]
                )
            if peers:
                for impl in args.peer_impls.split(","):
                    results[impl] = run_json([peers, str(HERE / "peers.py"), impl, setting, str(args.steps), device])
            ours = results["saeflow"].get("steps_per_s")
            for impl, r in results.items():
                row = f"{d:>5} {n:>9} {k:>3} {batch:>6} {precision:>4} | {impl:<10} "
                if "error" in r:
                    print(row + f"failed: {r['error'][:80]}")
                    continue
                ratio = "" if impl == "saeflow" or not ours else f"{ours / r['steps_per_s']:.2f}x"
                print(row + f"{r['steps_per_s'] * batch:>10.0f} {r['peak_mib']:>9.0f} | {ratio:>10}")


if __name__ == "__main__":
    main()
