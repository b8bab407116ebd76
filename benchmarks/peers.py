"""One training-throughput measurement of a peer library, run inside the peers' own venv.

    python peers.py sparsify|saelens D N K BATCH STEPS

Each peer runs its own per-batch training step at the same settings as saeflow's benchmark: TopK
with the same k, AuxK on (no latent dead yet, as in saeflow's run), Adam, decoder kept unit-norm
with the parallel gradient removed where the library does so. Prints one JSON line.
"""

import json
import resource
import sys
import time

import torch


def sparsify_step(d, n, k):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    dead = torch.zeros(n, dtype=torch.bool)

    def step(x):
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


def saelens_step(d, n, k):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    dead = torch.zeros(n, dtype=torch.bool)
    count = [0]

    def step(x):
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=count[0],
                           is_logging_step=False)
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        count[0] += 1

    return step


def main():
    impl, d, n, k, batch, steps = sys.argv[1], *map(int, sys.argv[2:7])
    torch.manual_seed(0)
    step = {"sparsify": sparsify_step, "saelens": saelens_step}[impl](d, n, k)
    xs = [torch.randn(batch, d) for _ in range(4)]
    step(xs[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(xs[i % 4])
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": steps * batch / elapsed,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
