"""One training-throughput measurement of a peer library, run inside the peers' own venv.

    python peers.py sparsify|saelens fp32|bf16,D,N,K,BATCH STEPS cpu|cuda

Each peer runs its own per-batch training step at the same settings as saeflow's benchmark: TopK
with the same k, AuxK on (no latent dead yet, as in saeflow's run), Adam, decoder kept unit-norm
with the parallel gradient removed where the library does so; bf16 wraps the forward in autocast,
as the peers' own trainers do on CUDA. sparsify's forward carries its own bf16 autocast on any GPU
that supports bf16 (`SparseCoder.forward`), so left alone its fp32 row would time its bf16 step: an
fp32 row turns that off (it asks `torch.cuda.is_bf16_supported` when it is imported), so that both
libraries do the same arithmetic. Prints one JSON line.
"""

import json
import sys

import torch
from train_throughput import time_steps


def sparsify_step(d, n, k, device, autocast):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    dead = torch.zeros(n, dtype=torch.bool, device=device)

    def step(x):
        with autocast:
            out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


def saelens_step(d, n, k, device, autocast):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    count = [0]

    def step(x):
        with autocast:
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=count[0], is_logging_step=False
                )
            )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        count[0] += 1

    return step


def main():
    impl, setting, steps, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    precision, *sizes = setting.split(",")
    d, n, k, batch = map(int, sizes)
    torch.manual_seed(0)
    if impl == "sparsify" and precision == "fp32":  # before sparsify is imported: its autocast off
        torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    step = {"sparsify": sparsify_step, "saelens": saelens_step}[impl](d, n, k, device, autocast)
    xs = [torch.randn(batch, d, device=device) for _ in range(4)]
    print(json.dumps(time_steps(lambda i: step(xs[i % 4]), steps, device)))


if __name__ == "__main__":
    main()
