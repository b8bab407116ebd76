"""Trains EleutherAI sparsify's cross-layer transcoder with its own code, on saeflow's cached rows.

    python peer_cross_layer.py JOB.json     # inside a venv holding sparsify's `clt` branch

sparsify's releases (1.3.3 is the newest) have no cross-layer transcoder; its unreleased `clt` branch
does (`--transcode --cross_layer N`). Its Trainer runs a Hugging Face model itself, so this runs the
body of that Trainer's step on the given rows, as the Trainer does at its defaults: one SparseCoder
per layer (n_targets = the layers from it to the last, n_sources as the Trainer counts them), each
layer's encoder bias set to -W_enc mean(input) and its first decoder bias to mean(output) on the first
batch, then per batch, layer by layer in order, the CrossLayerRunner's forward with `detach_grad` (the
FVU loss), the FVU's backward and the runner's restore; then the optimizer step: signum =
ScheduleFreeWrapper(SignSGD, momentum 0.95) at lr 5e-3 / sqrt(n / 2^14), AuxK off (auxk_alpha 0).
Predictions are taken at the schedule-free average, as the Trainer saves.

JOB: train (.npy rows [inputs | outputs] of L layers, float16, read in order), held (.npy rows to
predict), fire_rows (the rows whose firings are counted), layers, d, n_latents and k per layer,
batch, tokens, snapshots (budgets below tokens), skip, seed. Writes JOB.<tokens>.recon.npy
(predictions side by side) and JOB.<tokens>.fires.npy.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from peer_train import batches
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.runner import CrossLayerRunner
from sparsify.sign_sgd import SignSGD


def coders(job: dict) -> list:
    """One SparseCoder per layer, with the targets and sources sparsify's Trainer gives it."""
    L, d = job["layers"], job["d"]
    cfg = SparseCoderConfig(num_latents=job["n_latents"], k=job["k"], transcode=True, skip_connection=job["skip"])
    out, sources = [], []
    for position in range(L):
        torch.manual_seed(job["seed"])
        n_targets = min(L, L - position)  # cross_layer = L: every later layer
        sources.append(position + n_targets)
        while sources[0] < position:
            sources.pop(0)
        layer_cfg = replace(cfg, n_targets=n_targets, n_sources=len(sources))
        out.append(SparseCoder(d, layer_cfg, torch.device("cpu"), dtype=torch.float32))
    return out


def io(rows: torch.Tensor, layer: int, L: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, layer * d : (layer + 1) * d], rows[:, (L + layer) * d : (L + layer + 1) * d]


@torch.no_grad()
def initialise(sae, x: torch.Tensor, y: torch.Tensor) -> None:
    """What the Trainer's hook does on its first step: centred pre-activations, b_dec at the mean output."""
    weight = sae.encoder.weight.data
    sae.encoder.bias.data[:] = torch.nn.functional.linear(-x.mean(0), weight, sae.encoder.bias.data * 0)
    first = sae.b_decs[0] if hasattr(sae, "b_decs") else sae.b_dec
    first.data[:] = y.mean(0)


def predict(saes: list, rows: torch.Tensor, L: int, d: int, n: int, fire_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of every row, and each latent's firings on the first `fire_rows` rows."""
    runner, outs, fires = CrossLayerRunner(), [], np.zeros(L * n)
    with torch.no_grad():
        for start in range(0, len(rows), 4096):
            block, parts = rows[start : start + 4096], []
            for t, sae in enumerate(saes):
                x, y = io(block, t, L, d)
                out = runner(x, y, sparse_coder=sae, module_name=str(t))
                parts.append(out.sae_out.float())
                scored = slice(0, max(0, min(len(block), fire_rows - start)))
                fired = out.latent_indices[scored][out.latent_acts[scored] > 0].flatten().numpy()
                np.add.at(fires, fired + t * n, 1)
            runner.reset()
            outs.append(torch.cat(parts, dim=1))
    return torch.cat(outs).numpy(), fires


def main(path: str) -> None:
    job = json.loads(Path(path).read_text())
    L, d, n = job["layers"], job["d"], job["n_latents"]
    torch.set_num_threads(2)
    saes = coders(job)
    groups = [dict(params=sae.parameters(), lr=5e-3 / (sae.num_latents / 2**14) ** 0.5) for sae in saes]
    opt = ScheduleFreeWrapper(SignSGD(groups), momentum=0.95)
    opt.train()
    held = torch.from_numpy(np.load(job["held"]).astype(np.float32))
    runner = CrossLayerRunner()
    pending = sorted(job["snapshots"])

    def save(tokens: int) -> None:
        opt.eval()  # the schedule-free average, as the Trainer saves
        recon, fires = predict(saes, held, L, d, n, job["fire_rows"])
        opt.train()
        np.save(f"{path}.{tokens}.recon.npy", recon.astype(np.float32))
        np.save(f"{path}.{tokens}.fires.npy", fires)

    seen = 0
    for step, rows in enumerate(batches(job["train"], job["batch"], job["tokens"])):
        for t, sae in enumerate(saes):
            x, y = io(rows, t, L, d)
            if step == 0:
                initialise(sae, x, y)
            out = runner(x, y, sparse_coder=sae, module_name=str(t), detach_grad=True, dead_mask=None)
            out.fvu.backward()
            runner.restore()
        runner.reset()
        opt.step()
        opt.zero_grad()
        seen += len(rows)
        while pending and seen >= pending[0]:
            save(pending.pop(0))
    save(job["tokens"])


if __name__ == "__main__":
    main(sys.argv[1])
