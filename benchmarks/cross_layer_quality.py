"""What a cross-layer transcoder buys over a transcoder per layer: saeflow's cross-layer
skip-transcoder against per-layer skip-transcoders of the same latents per layer and the same k per
layer, at defaults, trained on the same batches, scored by one evaluation.

    python benchmarks/cross_layer_quality.py [--budgets 50000,100000,200000] [--json F]

The data: SmolLM2-135M's MLPs at layers 8-11 on the demo's corpus (quality_cross_layer.yaml: one LM
pass caches the four MLPs' inputs and outputs side by side, 204,800 training tokens so that every
budget is one pass over fresh tokens, shuffled once; a few minutes on first use). Both dictionaries
have 2048 latents per layer keeping 32 per token. The per-layer transcoders are packed into one
cross-layer coder whose blocks on later layers are zero (the same map), so that both go through
the same scorer:

- FVU per layer: each MLP output's sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 on held-out rows;
- dead: latents that fire on none of the held-out rows; L0: active latents per row (all layers);
- dCE / KL: next-token cross-entropy increase and KL of SmolLM2-135M with all four MLP outputs
  replaced at once, each layer's prediction reading the inputs of the spliced forward (errors
  compound down the layers), on held-out contexts (sae.evaluate.downstream_metrics).

No peer library is run: sparsify's newest release (1.3.3) has no cross-layer transcoder (its
unreleased `clt` branch is an experiment with unsettled defaults), SAELens only loads them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import CE_CONTEXTS, HELD_ROWS  # noqa: E402

SPEC = HERE / "quality_cross_layer.yaml"
BUDGETS = [50_000, 100_000, 200_000]


def cross_layer_data() -> dict:
    """The joined site's [inputs | outputs] rows: training rows shuffled once (seed 0, float16, in
    memory), held-out rows, CE contexts, and what the scorer needs of the spec."""
    from flows.spec import load_spec
    from flows.stages import store_url
    from storage import activations as store
    from storage import reading

    spec = load_spec(SPEC)
    if not store.is_complete(store_url(spec)):
        print(f"caching the MLPs' inputs and outputs (once, a few minutes): saeflow cache {SPEC}", flush=True)
        subprocess.run([str(Path(sys.executable).parent / "saeflow"), "cache", str(SPEC)], check=True, cwd=HERE.parent)
    group = store.open_store(store_url(spec), verify=True)
    site = spec.sites()[0]
    train = store.activations(group, "train", site)
    rows = torch.empty(train.shape, dtype=torch.float16)
    at = 0
    for block in reading.iter_rows(train, 16384):
        rows[at : at + len(block)] = block.half()
        at += len(block)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    held = torch.cat(list(reading.iter_rows(store.activations(group, "eval", site), 4096, stop=HELD_ROWS)))
    return {
        "spec": spec,
        "site": site,
        "train": rows.numpy(),
        "held": held,
        "contexts": torch.from_numpy(group["eval/tokens"][-CE_CONTEXTS:]).long(),
        "first": int(spec.data.drop_first_position),
    }


def train_cross_layer(data: dict, cfg, tokens: int, snapshots) -> dict[int, object]:
    """saeflow's cross-layer transcoder at its defaults after each budget (one run, scored on the way)."""
    from sae import TrainConfig, train_sae

    batch = data["spec"].train.batch_tokens
    on_the_way: list = []

    def keep(sae) -> dict:
        on_the_way.append(sae)
        return {}

    tcfg = TrainConfig(batch_tokens=batch, tokens=tokens)
    result = train_sae(cfg, tcfg, data["train"], progress=False, milestones=snapshots, evaluate=keep)
    return {**dict(zip(sorted(snapshots), on_the_way)), tokens: result.sae}


def train_per_layer(data: dict, cfg, tokens: int, snapshots) -> dict[int, object]:
    """A skip-transcoder per layer (n / L latents, k / L), each on its layer's columns of the same
    batches, packed into one cross-layer coder per budget."""
    from sae import SAEConfig

    layers, d = cfg.layers(), cfg.d_in
    single = SAEConfig(
        d, cfg.n_latents // layers, cfg.k // layers, transcoder=True, skip_connection=cfg.skip_connection
    )
    each: list[dict[int, object]] = []
    for t in range(layers):
        cols = np.r_[t * d : (t + 1) * d, (layers + t) * d : (layers + t + 1) * d]
        layer_data = dict(data, train=data["train"][:, cols])
        each.append(train_cross_layer(layer_data, single, tokens, snapshots))
    return {budget: pack(cfg, [per[budget] for per in each]) for budget in each[0]}


@torch.no_grad()
def pack(cfg, transcoders: list) -> object:
    """One cross-layer coder computing what the per-layer transcoders compute: their encoders
    stacked, their decoders on the diagonal blocks (zero on later layers), scales, biases and skips
    side by side."""
    from sae import TopKSAE

    out = TopKSAE(cfg)
    m, d = cfg.n_latents // cfg.layers(), cfg.d_in
    out.W_dec.zero_()
    for t, tc in enumerate(transcoders):
        rows, cols = slice(t * m, (t + 1) * m), slice(t * d, (t + 1) * d)
        out.W_enc[rows] = tc.W_enc
        out.b_enc[rows] = tc.b_enc
        out.W_dec[rows, cols] = tc.W_dec
        out.b_pre[cols] = tc.b_pre
        out.input_scale[t] = tc.input_scale
        out.target_scale[t] = tc.target_scale
        if cfg.skip_connection:
            out.W_skip[cols] = tc.W_skip
    return out.eval()


def score(data: dict, sae, model) -> dict:
    from sae.evaluate import downstream_metrics, reconstruction_metrics

    held = data["held"]
    rec = reconstruction_metrics(sae, [held], progress=False)
    mean_out = sae.split(held)[1].mean(0)
    down = downstream_metrics(
        sae, model, data["contexts"], data["site"], data["first"], mean_out, batch_contexts=16, progress=False
    )
    layers = sae.cfg.layers()
    return {
        "fvu_layers": [rec[f"normalized_mse_layer_{t}"] for t in range(layers)],
        "dead": rec["dead_fraction"],
        "l0": rec["l0"],
        "dce": down["ce_increase"],
        "kl": down["kl_divergence"],
        "dce_zero": down["ce_zero_ablation"] - down["ce_clean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from sae.lm import load_lm

    grid = sorted(int(b) for b in args.budgets.split(","))
    data = cross_layer_data()
    spec = data["spec"]
    d = spec.d_model_of(data["held"].shape[1])
    cfg = spec.sae_config(d)
    model = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())[0]
    first, *_, last = spec.hookpoints[0].split("+")
    print(f"MLPs {first} .. {last}; {cfg.n_latents // cfg.layers()} latents and k {cfg.k // cfg.layers()} per layer")
    header = "tokens  dictionary   " + " ".join(f"FVU L{t}" for t in range(cfg.layers()))
    print(f"{header} {'dead':>6} {'L0':>6} {'dCE':>6} {'KL':>6} {'sec':>5}")
    rows: list[dict] = []
    started = time.time()
    for name, train in (("cross-layer", train_cross_layer), ("per-layer", train_per_layer)):
        t0 = time.time()
        trained = train(data, cfg, grid[-1], grid[:-1])
        seconds = time.time() - t0
        for tokens, sae in sorted(trained.items()):
            row = {"tokens": tokens, "dictionary": name, "seconds": seconds, **score(data, sae, model)}
            rows.append(row)
            fvus = " ".join(f"{v:>6.4f}" for v in row["fvu_layers"])
            print(
                f"{tokens:>6} {name:<12} {fvus} {row['dead']:>6.1%} {row['l0']:>6.1f} {row['dce']:>6.3f} "
                f"{row['kl']:>6.3f} {seconds:>5.0f}",
                flush=True,
            )
    print(f"zero-ablating all four MLPs: dCE {rows[0]['dce_zero']:.3f}; total {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
