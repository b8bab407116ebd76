"""Skip-transcoder quality per token: saeflow against EleutherAI sparsify's `--transcode
--skip_connection`, each at its defaults, side by side, one scorer.

    python benchmarks/transcoder_quality.py [--layers 12,20] [--batch 1024] [--budgets 100000,200000,400000]
                                            [--json F] [--no-peers]

The data: SmolLM2-135M's MLPs at layers 12 and 20 on the demo's corpus (quality_transcoder.yaml: one
LM pass caches each MLP's input and output, [input | output] rows, 409,600 training tokens so that
every budget is one pass over fresh tokens, shuffled once; about 5 minutes on first use). Both
libraries train a skip-transcoder of 4096 latents with k 32 on the same batches in the same order
(sparsify inside the peers' venv, peer_train.py, with what its Trainer does for transcoders), and
are scored on the same held-out rows:

- FVU: sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 of the MLP's output y predicted from its input;
  FVU*: the same without massive-activation rows (quality.massive_rows; none may exist at an MLP);
- dead: latents that fire on none of the held-out rows; L0: mean active latents per row;
- dCE: next-token cross-entropy increase of SmolLM2-135M with the MLP's output replaced by the
  prediction, on held-out contexts.

sparsify at its defaults trains once to the largest budget and is scored at the smaller ones on its
way; saeflow likewise where its settings are the same at several budgets (quality.budget_groups).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from peer_runs import PeerWorkers  # noqa: E402
from quality import (  # noqa: E402
    CE_CONTEXTS,
    DATA,
    REAL_HELD_ROWS,
    budget_groups,
    cached_spec,
    delta_ce,
    massive_rows,
    run_peer,
    safe,
    trained_outputs,
)
from train_throughput import peers_python  # noqa: E402

SPEC = HERE / "quality_transcoder.yaml"
SHAPE = dict(n_latents=4096, k=32)
BUDGETS = [100_000, 200_000, 400_000]


def transcoder_data(hook: str) -> dict:
    """[input | output] rows of the MLP `hook` from the store of quality_transcoder.yaml, as .npy files:
    the training rows shuffled once (seed 0), the held-out rows, and the CE contexts' rows."""
    from flows.stages import store_url
    from sae.lm import capture, load_lm
    from storage import activations as store
    from storage import reading

    spec, root = cached_spec(SPEC, "transcoders", hook)
    out = root / safe(hook)
    if not (out / "done").exists():
        group = store.open_store(store_url(spec), verify=True)
        contexts = torch.from_numpy(group["eval/tokens"][-CE_CONTEXTS:]).long()
        model, _ = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())
        first = int(spec.data.drop_first_position)
        captured = capture(model, contexts, spec.sites())
        for h in spec.hookpoints:
            site, where = spec.site(h), root / safe(h)
            where.mkdir(parents=True, exist_ok=True)
            rows = torch.cat(list(reading.iter_rows(store.activations(group, "train", site), 65536)))
            shuffled = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
            np.save(where / "train.npy", shuffled.half().numpy())
            held = torch.cat(list(reading.iter_rows(store.activations(group, "eval", site), 4096, stop=REAL_HELD_ROWS)))
            acts = captured[site][:, first:]
            np.save(where / "held.npy", torch.cat([held, acts.reshape(-1, acts.shape[-1]).float()]).half().numpy())
            np.save(where / "contexts.npy", contexts.numpy())
            (where / "done").write_text("")
    d = np.load(out / "held.npy", mmap_mode="r").shape[1] // 2
    return {
        "train": out / "train.npy",
        "held": out / "held.npy",
        "features": None,
        "shape": dict(SHAPE, d=d),
        "held_rows": REAL_HELD_ROWS,  # then the CE contexts' rows
        "contexts": np.load(out / "contexts.npy"),
        "spec": spec,
        "hook": hook,
        "job": {"transcode": True, "skip": True},
    }


def run_saeflow(data: dict, tokens: int, snapshots=()) -> dict[int, dict]:
    """saeflow's skip-transcoder at its defaults after `tokens` (and each of `snapshots` on the way)."""
    from sae import SAEConfig, TrainConfig

    s = data["shape"]
    cfg = SAEConfig(s["d"], s["n_latents"], s["k"], transcoder=True, skip_connection=True)
    inputs = torch.from_numpy(np.load(data["held"]).astype(np.float32))[:, : s["d"]]
    return trained_outputs(cfg, TrainConfig(batch_tokens=s["batch"], tokens=tokens), data["train"], inputs, snapshots)


def score(data: dict, out: dict) -> dict:
    """FVU (and FVU*) of the predicted output on the held-out rows, dead, L0, and dCE on the CE contexts."""
    d = data["shape"]["d"]
    y = np.load(data["held"]).astype(np.float64)[:, d:]
    predicted = out["recon"].astype(np.float64)
    y_held, p_held = y[: data["held_rows"]], predicted[: data["held_rows"]]
    typical = ~massive_rows(y_held)
    yt, pt = y_held[typical], p_held[typical]
    return {
        "fvu": float(((y_held - p_held) ** 2).sum() / ((y_held - y_held.mean(0)) ** 2).sum()),
        "fvu_typical": float(((yt - pt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum()),
        "massive_rows": int((~typical).sum()),
        "dead": float((out["fires"] == 0).mean()),
        "l0": float(out["fires"].sum() / len(y)),
        "dce": delta_ce(data, predicted[data["held_rows"] :]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="12,20")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peers-python", help="an interpreter that has the peers (default: .bench-peers)")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    grid = [int(b) for b in args.budgets.split(",")]
    workers = None if args.no_peers else PeerWorkers(peers_python(args.peers_python), DATA / "work")
    if workers:
        workers.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    header = f"{'MLP':<20} {'tokens':>7} {'library':<9} {'FVU':>7} {'FVU*':>7} {'dead':>6} {'L0':>6} {'dCE':>6}"
    print(f"{header} {'sec':>5}")
    started = time.time()
    for layer in args.layers.split(","):
        hook = f"model.layers.{layer}.mlp"
        data = dict(transcoder_data(hook), name=f"L{layer}-mlp/b{args.batch}")
        data["shape"] = dict(data["shape"], batch=args.batch)
        runs = [("saeflow", g) for g in budget_groups(data, grid)]
        runs += [] if workers is None else [("sparsify", grid)]
        for library, budgets in runs:
            t0 = time.time()
            if library == "saeflow":
                found = run_saeflow(data, budgets[-1], tuple(budgets[:-1]))
            else:
                assert workers is not None
                found, _ = run_peer(workers, "sparsify", data, budgets[-1], "defaults", 0, tuple(budgets[:-1]))
            seconds = time.time() - t0
            for tokens, out in sorted(found.items()):
                row = {"mlp": hook, "tokens": tokens, "library": library, "seconds": seconds, **score(data, out)}
                rows.append(row)
                print(
                    f"{hook:<20} {tokens:>7} {library:<9} {row['fvu']:>7.4f} {row['fvu_typical']:>7.4f} "
                    f"{row['dead']:>6.1%} {row['l0']:>6.1f} {row['dce']:>6.3f} {seconds:>5.0f}",
                    flush=True,
                )
    if workers:
        workers.close()
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
