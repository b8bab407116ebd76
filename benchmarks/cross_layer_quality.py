"""Cross-layer transcoders side by side: saeflow's cross-layer skip-transcoder, EleutherAI sparsify's
(`--transcode --cross_layer 4 --skip_connection`, from its own code), and saeflow's per-layer
skip-transcoders of the same latents and k per layer, each at its defaults, on the same batches,
scored by one scorer.

    python benchmarks/cross_layer_quality.py [--budgets 50000,100000,200000] [--json F]
                                             [--peer-python PY | --no-peers] [--no-per-layer]
                                             [--decoder-init random|data] [--seed N]

The data: SmolLM2-135M's MLPs at layers 8-11 on the demo's corpus (quality_cross_layer.yaml: one LM
pass caches the four MLPs' inputs and outputs side by side, 204,800 training tokens so that every
budget is one pass over fresh tokens, shuffled once; a few minutes on first use). Both dictionaries
have 2048 latents per layer keeping 32 per token:

- FVU per layer: each MLP output's sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 on held-out rows;
- dead: latents that fire on none of the held-out rows; L0: active latents per row (all layers);
- dCE: next-token cross-entropy increase of SmolLM2-135M on held-out contexts with all four MLP
  outputs replaced at once by the predictions from the clean forward's MLP inputs (the same for
  every dictionary); dCE spliced (saeflow's dictionaries only, sae.evaluate.downstream_metrics, what
  saeflow's evaluation reports): each layer's prediction reads the inputs of the spliced forward,
  so errors compound down the layers. The per-layer transcoders go through it packed into one
  cross-layer coder whose blocks on later layers are zero (the same map).

sparsify's releases (1.3.3 is the newest) have no cross-layer transcoder; its unreleased `clt` branch
(commit d7f7368, May 2025) does. It runs in its own venv (`--peer-python`, default
.bench-data/peers-clt/venv: `pip install torch==2.13.0 triton "eai-sparsify @
git+https://github.com/EleutherAI/sparsify@d7f7368"`), driven by peer_cross_layer.py with its
Trainer's defaults, on CPU with its eager decoder (SPARSIFY_DISABLE_TRITON=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import CE_CONTEXTS, DATA, HELD_ROWS, delta_ce, trained_outputs  # noqa: E402

SPEC = HERE / "quality_cross_layer.yaml"
BUDGETS = [50_000, 100_000, 200_000]
PEER_PYTHON = DATA.parent / "peers-clt" / "venv" / "bin" / "python"


def cross_layer_data() -> dict:
    """The joined site's [inputs | outputs] rows: training rows shuffled once (seed 0, float16, also
    as a .npy for the peer), held-out rows followed by the CE contexts' rows (held), CE contexts, and
    what the scorer needs of the spec."""
    from flows.spec import load_spec
    from flows.stages import store_url
    from sae.lm import capture, load_lm
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
    contexts = np.asarray(group["eval/tokens"][-CE_CONTEXTS:])
    first = int(spec.data.drop_first_position)
    model = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())[0]
    ce_rows = capture(model, torch.from_numpy(contexts).long(), [site])[site][:, first:]
    held = torch.cat([held, ce_rows.reshape(-1, ce_rows.shape[-1]).float()])
    files = DATA / f"cross-layer-{store_url(spec).rstrip('/').rsplit('/', 1)[-1]}"
    if not (files / "done").exists():
        files.mkdir(parents=True, exist_ok=True)
        np.save(files / "train.npy", rows.numpy())
        np.save(files / "held.npy", held.half().numpy())
        (files / "done").write_text("")
    return {
        "spec": spec,
        "site": site,
        "hook": site,  # what quality.delta_ce splices
        "train": rows.numpy(),
        "held": held,
        "files": files,
        "contexts": contexts,
        "first": first,
        "model": model,
    }


def train_cross_layer(data: dict, cfg, tokens: int, snapshots, **settings) -> dict[int, object]:
    """saeflow's cross-layer transcoder at its defaults (but for `settings`, TrainConfig fields) after
    each budget (one run, kept on the way)."""
    from sae import TrainConfig

    tcfg = TrainConfig(batch_tokens=data["spec"].train.batch_tokens, tokens=tokens, **settings)
    return trained_outputs(cfg, tcfg, data["train"], None, snapshots, outputs=lambda sae: sae)


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


def saeflow_outputs(data: dict, sae) -> dict:
    """What the scorer reads: predictions of every held row (held-out, then the CE contexts'), each
    latent's firings on the held-out rows, and the spliced dCE of saeflow's own evaluation."""
    from sae.evaluate import downstream_metrics

    with torch.no_grad():
        codes = sae.encode(sae.split(data["held"])[0])
        recon = sae.decode(codes)
    fired = (codes.values[:HELD_ROWS] > 0).flatten().float()
    fires = torch.zeros(sae.cfg.n_latents).index_add_(0, codes.indices[:HELD_ROWS].flatten(), fired)
    mean_out = sae.split(data["held"][:HELD_ROWS])[1].mean(0)
    spliced = downstream_metrics(
        sae,
        data["model"],
        torch.from_numpy(data["contexts"]).long(),
        data["site"],
        data["first"],
        mean_out,
        batch_contexts=16,
        progress=False,
    )
    return {"recon": recon.numpy(), "fires": fires.numpy(), "dce_spliced": spliced["ce_increase"]}


def sparsify_outputs(data: dict, cfg, tokens: int, snapshots, python: str) -> dict[int, dict]:
    """sparsify's cross-layer transcoder at its defaults, by its own code in its venv."""
    L = cfg.layers()
    job_path = data["files"] / f"sparsify-{tokens}.json"
    job = {
        "train": str(data["files"] / "train.npy"),
        "held": str(data["files"] / "held.npy"),
        "fire_rows": HELD_ROWS,
        "layers": L,
        "d": cfg.d_in,
        "n_latents": cfg.n_latents // L,
        "k": cfg.k // L,
        "batch": data["spec"].train.batch_tokens,
        "tokens": tokens,
        "snapshots": sorted(snapshots),
        "skip": cfg.skip_connection,
        "seed": 0,
    }
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": str(HERE)}
    subprocess.run([python, str(HERE / "peer_cross_layer.py"), str(job_path)], check=True, env=env)
    return {
        budget: {"recon": np.load(f"{job_path}.{budget}.recon.npy"), "fires": np.load(f"{job_path}.{budget}.fires.npy")}
        for budget in [*sorted(snapshots), tokens]
    }


def score(data: dict, out: dict, L: int, d: int) -> dict:
    """FVU per layer and dead latents on the held-out rows, L0, and the dCE of the predictions spliced."""
    y = data["held"][:, L * d :].double().numpy()
    recon = out["recon"].astype(np.float64)
    fvu = []
    for t in range(L):
        yt, pt = y[:HELD_ROWS, t * d : (t + 1) * d], recon[:HELD_ROWS, t * d : (t + 1) * d]
        fvu.append(float(((yt - pt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum()))
    return {
        "fvu_layers": fvu,
        "dead": float((out["fires"] == 0).mean()),
        "dead_layers": (out["fires"] == 0).reshape(L, -1).mean(1).tolist(),  # each layer's block of latents
        "l0": float(out["fires"].sum() / HELD_ROWS),
        "dce": delta_ce(data, recon[HELD_ROWS:]),
        "dce_spliced": out.get("dce_spliced"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--peer-python", default=str(PEER_PYTHON), help="a python that has sparsify's clt branch")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--decoder-init", choices=["random", "data"], help="saeflow's cross-layer row at this init")
    parser.add_argument("--seed", type=int, default=0, help="saeflow's cross-layer row's seed")
    parser.add_argument("--no-per-layer", action="store_true", help="leave out the per-layer transcoders")
    args = parser.parse_args()
    torch.set_num_threads(2)
    grid = sorted(int(b) for b in args.budgets.split(","))
    data = cross_layer_data()
    spec = data["spec"]
    d = spec.d_model_of(data["held"].shape[1])
    cfg = spec.sae_config(d)
    L = cfg.layers()
    first, *_, last = spec.hookpoints[0].split("+")
    print(f"MLPs {first} .. {last}; {cfg.n_latents // L} latents and k {cfg.k // L} per layer")
    zero = delta_ce(data, np.zeros((len(data["held"]) - HELD_ROWS, L * d)))
    print(f"dCE with all {L} MLP outputs zeroed: {zero:.3f}")
    print(f"{'tokens':>6} {'dictionary':<22} " + " ".join(f"FVU L{t}" for t in range(L)), end="")
    print(f" {'dead':>6} {'L0':>6} {'dCE':>6} {'spliced':>7} {'sec':>5}  dead per layer")
    budget, on_the_way = grid[-1], grid[:-1]
    settings = {"seed": args.seed, **({"decoder_init": args.decoder_init} if args.decoder_init else {})}
    runs = [("saeflow cross-layer", lambda: train_cross_layer(data, cfg, budget, on_the_way, **settings))]
    if not args.no_peers and Path(args.peer_python).exists():
        runs.append(("sparsify cross-layer", lambda: sparsify_outputs(data, cfg, budget, on_the_way, args.peer_python)))
    elif not args.no_peers:
        print(f"(no {args.peer_python}: sparsify's cross-layer transcoder is left out; see this file's docstring)")
    if not args.no_per_layer:
        runs.append(("saeflow per-layer", lambda: train_per_layer(data, cfg, budget, on_the_way)))
    rows: list[dict] = []
    started = time.time()
    for name, train in runs:
        t0 = time.time()
        trained = train()
        seconds = time.time() - t0
        for tokens, found in sorted(trained.items()):
            out = found if isinstance(found, dict) else saeflow_outputs(data, found)
            row = {"tokens": tokens, "dictionary": name, "seconds": seconds, **score(data, out, L, d)}
            rows.append(row)
            fvus = " ".join(f"{v:>6.4f}" for v in row["fvu_layers"])
            spliced = "-" if row["dce_spliced"] is None else f"{row['dce_spliced']:.3f}"
            print(
                f"{tokens:>6} {name:<22} {fvus} {row['dead']:>6.1%} {row['l0']:>6.1f} {row['dce']:>6.3f} "
                f"{spliced:>7} {seconds:>5.0f}  " + " ".join(f"{v:.1%}" for v in row["dead_layers"]),
                flush=True,
            )
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"zero_ablation_dce": zero, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
