"""SAE quality per token: saeflow, EleutherAI sparsify and SAELens side by side, one scorer.

    python benchmarks/quality.py [--quick] [--regimes a,b] [--layers 3,27] [--batches 1024,4096]
                                 [--seeds 3] [--no-real] [--no-peers] [--lr-sweep 0.5,2] [--json F]

Every library trains with its own code (the peers inside their own venv, .bench-peers/, see
peer_train.py) on the same batches in the same order, at equal token budgets, and is scored on the
same held-out rows in the raw activation space:

- normalized MSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over held-out rows;
- dictionary recovery (synthetic data only): for each true feature the best cosine with a decoder
  row; the mean, and the fraction above 0.9;
- dead: latents that fire on none of the held-out rows; L0: mean active latents per row;
- dCE (real data only): next-token cross-entropy increase of SmolLM2-135M with the reconstruction
  of each library spliced in at the hookpoint, on held-out contexts;
- nMSE* (real data only): normalized MSE without the massive-activation rows (`massive_rows`: at
  layer 20, 7 of the 8192 held-out rows carry 94% of the variance, so the plain nMSE is theirs).

Settings: `defaults` (each library as a new user gets it) at every budget, and `same` (Adam at one
lr, linear decay to zero, AuxK 1/32, one dead window) at the middle budget of the synthetic cells
and of the real cell the defaults were tuned on. Synthetic data: see synthetic.py (d 128, 2048
latents, k 16: the issue's 256/4096/32 at a quarter of the cost; `wide`: d 512, 8192 latents, k 32,
16384 true features). Real data: SmolLM2-135M's residual stream after layers 3, 12, 20 and 27 on
the demo's corpus (quality_real.yaml; 409,600 tokens cached from one LM pass on first use, about 8
minutes, so every budget is one pass over fresh tokens, shuffled once), 4096 latents, k 32, batches
of 1024, 4096 and 16384, with seeds 0-2 at the middle budget. A peer at its defaults trains once to
the largest budget and is scored at the smaller ones on its way (nothing in its defaults depends on
the budget; peer_train.py --check-snapshots shows the states equal). `--lr-sweep 0.5,2` also trains
saeflow at those multiples of its auto lr.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from peer_runs import PeerWorkers, output_files  # noqa: E402
from synthetic import REGIMES, PlantedDictionary, Regime, held_out  # noqa: E402
from train_throughput import peers_python  # noqa: E402

DATA = HERE.parent / ".bench-data" / "quality"
SYNTH = dict(d=128, n_latents=2048, k=16, batch=4096)
SYNTH_BUDGETS = [2**17, 2**19, 2**20]
REAL = dict(n_latents=4096, k=32)
REAL_BUDGETS = [100_000, 200_000, 400_000]
REAL_HOOKS = ("model.layers.3", "model.layers.12", "model.layers.20", "model.layers.27")  # quality_real.yaml's
REAL_BATCHES = (1024, 4096, 16384)
TUNING_CELL = "L20/b1024"  # where the defaults were tuned: the identical-settings rows are run here
SEEDS = 3  # seeds of the real cells at the middle budget
# a wide planted dictionary: d 512, 8192 latents, 16384 true features (more than latents, as in an LM)
WIDE = dict(d=512, n_latents=8192, k=32, batch=4096)
WIDE_REGIME = Regime("wide", n_features=16384, d=512)
WIDE_BUDGETS = [2**16, 2**17, 2**18]
SAME = dict(lr=2e-3, aux_coef=1 / 32)  # the identical-optimizer setting, run at the middle budget
HELD_ROWS = 8192  # a synthetic regime's held-out rows
# The held-out rows of the real cells and of the transcoder benchmark: the first 20,480 of the eval
# split (24,576 tokens, ~50 of the corpus's 63 held-out documents; 8192 rows spanned 11, too few to
# tell a rare latent from a dead one: docs/benchmarks.md); the CE contexts are the split's last ones.
REAL_HELD_ROWS = 20480
CE_CONTEXTS = 32


# data ---------------------------------------------------------------------------------------------
def synthetic_data(name: str, tokens: int) -> dict:
    """Training rows (float16 .npy, made once), held-out rows and the true features of a regime at
    the benchmark's size: the issue's regimes with d, feature count and firing halved; `wide` at d 512
    with 8192 latents."""
    if name == WIDE_REGIME.name:
        regime, shape = WIDE_REGIME, WIDE
    else:
        base = REGIMES[name]
        shape = SYNTH
        regime = dataclasses.replace(base, d=SYNTH["d"], n_features=base.n_features // 2, active=base.active / 2)
    key = hashlib.sha256(json.dumps([regime.to_dict(), tokens, shape["batch"]]).encode()).hexdigest()[:10]
    out = DATA / f"{name}-{key}"
    if not (out / "done").exists():
        out.mkdir(parents=True, exist_ok=True)
        gen = PlantedDictionary(regime, seed=0)
        train = np.lib.format.open_memmap(out / "train.npy", "w+", np.float16, (tokens, regime.d))
        for i, start in enumerate(range(0, tokens, shape["batch"])):
            train[start : start + shape["batch"]] = gen.batch(i, shape["batch"]).half().numpy()
        train.flush()
        np.save(out / "held.npy", held_out(gen, HELD_ROWS).half().numpy())
        np.save(out / "features.npy", gen.features.numpy())
        (out / "done").write_text("")
    return {
        "name": name,
        "train": out / "train.npy",
        "held": out / "held.npy",
        "features": np.load(out / "features.npy"),
        "shape": shape,
        "held_rows": HELD_ROWS,
    }


def cached_spec(spec_path: Path, prefix: str, hook: str):
    """(spec, the folder of its .npy files): DATA/<prefix>-<key>, keyed by the held-out split's settings
    too (the store keeps its train rows when only they change). Runs `saeflow cache` when `hook`'s
    files are missing there: it caches what the store lacks, all of it (minutes, one LM pass) or, after
    an eval change, the held-out split alone."""
    from flows.paths import EVAL_SPLIT_SECTIONS
    from flows.spec import load_spec

    spec = load_spec(spec_path)
    root = DATA / f"{prefix}-{spec.part_hash(*EVAL_SPLIT_SECTIONS)}"
    if not (root / safe(hook) / "done").exists():
        print(f"caching activations: saeflow cache {spec_path}", flush=True)
        saeflow = str(Path(sys.executable).parent / "saeflow")
        subprocess.run([saeflow, "cache", str(spec_path)], check=True, cwd=HERE.parent)
    return spec, root


def real_data(hook: str) -> dict:
    """Cached activations of the demo's model at one hookpoint of quality_real.yaml (409,600 training
    tokens, so every budget is a single pass) as .npy files, and held-out contexts with their
    activations. One LM pass caches every hookpoint (`saeflow cache`) and captures the CE contexts'.

    The training rows are shuffled once (seed 0): the store keeps each context's tokens together, and
    every library trains on shuffled rows in its own pipeline (saeflow's train stage included)."""
    from flows.stages import store_url
    from sae.lm import capture, load_lm
    from storage import activations as store
    from storage import reading

    spec, root = cached_spec(HERE / "quality_real.yaml", "real", hook)
    out = root / safe(hook)
    if not (out / "done").exists():
        group = store.open_store(store_url(spec), verify=True)
        # contexts for dCE: the last eval contexts, their activations recomputed (rows after the first position)
        contexts = torch.from_numpy(group["eval/tokens"][-CE_CONTEXTS:]).long()
        model, _ = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())
        first = int(spec.data.drop_first_position)
        captured = capture(model, contexts, list(spec.hookpoints))
        for h in spec.hookpoints:
            where = root / safe(h)
            where.mkdir(parents=True, exist_ok=True)
            train = store.activations(group, "train", h)
            rows = torch.cat(list(reading.iter_rows(train, 65536)))
            np.save(
                where / "train.npy",
                rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))].half().numpy(),
            )
            held = torch.cat(list(reading.iter_rows(store.activations(group, "eval", h), 4096, stop=REAL_HELD_ROWS)))
            acts = captured[h][:, first:]
            np.save(where / "held.npy", torch.cat([held, acts.reshape(-1, acts.shape[-1]).float()]).half().numpy())
            np.save(where / "contexts.npy", contexts.numpy())
            (where / "done").write_text("")
    d = np.load(out / "held.npy", mmap_mode="r").shape[1]
    return {
        "train": out / "train.npy",
        "held": out / "held.npy",
        "features": None,
        "shape": dict(REAL, d=d),
        "held_rows": REAL_HELD_ROWS,  # then the CE contexts' rows
        "contexts": np.load(out / "contexts.npy"),
        "spec": spec,
        "hook": hook,
    }


def safe(hook: str) -> str:
    return hook.replace(".", "-")


# training -----------------------------------------------------------------------------------------
def run_saeflow(data: dict, tokens: int, settings: str, seed: int = 0, snapshots=(), **overrides) -> dict[int, dict]:
    """saeflow's outputs after `tokens`, and after each of `snapshots` on the way (only where its
    settings are the same at those budgets: `budget_groups`), by budget."""
    from sae import SAEConfig, TrainConfig

    s = data["shape"]
    if settings == "same":
        overrides = dict(
            optimizer="adam",
            lr=SAME["lr"],
            lr_warmup_tokens=0,
            lr_decay="linear",
            aux_coef=SAME["aux_coef"],
            dead_tokens=dead_window(tokens),
            **overrides,
        )
    tcfg = TrainConfig(batch_tokens=s["batch"], tokens=tokens, seed=seed, **overrides)
    held = torch.from_numpy(np.load(data["held"]).astype(np.float32))
    return trained_outputs(SAEConfig(s["d"], s["n_latents"], s["k"]), tcfg, data["train"], held, snapshots)


def trained_outputs(cfg, tcfg, train, held: torch.Tensor | None, snapshots=(), outputs=None) -> dict[int, Any]:
    """What the scorer reads of a saeflow run on the rows `train` (a .npy path or an array): the
    held-out outputs (an SAE's reconstructions; a transcoder's predictions, `held` being the inputs),
    decoder rows and firing counts, or `outputs(sae)` when given, after tcfg.tokens and after each of
    `snapshots` on the way, by budget."""
    from sae import train_sae

    def held_outputs(sae) -> dict:
        assert held is not None, "trained_outputs: give held rows, or outputs="
        with torch.no_grad():
            codes = sae.encode(held)
            recon = sae.decode(codes)
        fires = torch.zeros(cfg.n_latents).index_add_(0, codes.indices.flatten(), (codes.values > 0).flatten().float())
        return {"recon": recon.numpy(), "decoder": sae.W_dec.detach().numpy(), "fires": fires.numpy()}

    keep = outputs or held_outputs
    rows = np.load(train, mmap_mode="r") if isinstance(train, (str, Path)) else train
    on_the_way: list = []
    result = train_sae(
        cfg,
        tcfg,
        rows,
        progress=False,
        milestones=snapshots,
        evaluate=lambda sae: on_the_way.append(keep(sae)) or {},
    )
    return {**dict(zip(sorted(snapshots), on_the_way)), tcfg.tokens: keep(result.sae)}


def budget_groups(data: dict, grid: list[int], **overrides) -> list[list[int]]:
    """The grid's budgets grouped by the settings saeflow trains with at each (lr, optimizer, schedule,
    dead window): within a group a run to the largest budget passes through each smaller budget's
    run, and is scored on the way, as the peers are (tests/test_train.py shows a milestone's SAE equal
    to a run stopped there). On the real cells the lr cap takes the short-run factor away at d 576 and
    sign descent warms up over the same 4 steps in runs of 8 steps or more, so most budgets
    share a run; the synthetic ones differ in lr.
    `overrides`: a variant's TrainConfig fields."""
    from sae import TrainConfig

    s = data["shape"]
    n, d = s["n_latents"], s["d"]
    groups: dict[tuple, list[int]] = {}
    for tokens in grid:
        t = TrainConfig(batch_tokens=s["batch"], tokens=tokens, **overrides)
        key = (t.resolved_lr(n, d), t.resolved_optimizer(), t.warmup_tokens(), t.decay(), t.dead_window(n, s["k"]))
        groups.setdefault(key, []).append(tokens)
    return [sorted(g) for g in groups.values()]


def run_peer(
    workers: PeerWorkers, library: str, data: dict, tokens: int, settings: str, seed: int = 0, snapshots=()
) -> tuple[dict[int, dict], bool]:
    """The peer's outputs after `tokens`, and after each of `snapshots` (shorter budgets, passed through
    on the way: peer_train.py), by budget; and whether they were a sealed earlier run's (peer_runs.py)."""
    s = data["shape"]
    job = dict(
        library=library,
        settings=settings,
        d=s["d"],
        n_latents=s["n_latents"],
        k=s["k"],
        batch=s["batch"],
        tokens=tokens,
        snapshots=list(snapshots),
        seed=seed,
        train=str(data["train"]),
        held=str(data["held"]),
        lr=SAME["lr"],
        aux_coef=SAME["aux_coef"],
        warmup_steps=0,
        dead_tokens=dead_window(tokens),
        threads=2,
        **data.get("job", {}),  # e.g. a transcoder's: transcode, skip
    )
    path = peer_run_path(workers.work, data["name"], library, settings, tokens, seed)
    path.write_text(json.dumps(job))
    reused = workers.run(library, path)
    found = {}
    for budget, files in output_files(path, tokens, snapshots).items():
        out = {key: np.load(file) for key, file in files.items()}
        if out["decoder"].shape[0] != s["n_latents"]:  # (d, n) layouts
            out["decoder"] = out["decoder"].T
        found[budget] = out
    return found, reused


def peer_run_path(work: Path, cell: str, library: str, settings: str, tokens: int, seed: int) -> Path:
    """A peer job's file; its outputs lie beside it (.recon.npy, ...; a snapshot's as .BUDGET.recon.npy)."""
    return work / f"{cell.replace('/', '-')}-{library}-{settings}-{tokens}-s{seed}.json"


def default_lr(data: dict, tokens: int) -> float:
    from sae import TrainConfig

    s = data["shape"]
    return TrainConfig(batch_tokens=s["batch"], tokens=tokens).resolved_lr(s["n_latents"], s["d"])


def dead_window(tokens: int) -> int:
    return max(4096, tokens // 20)


# scoring ------------------------------------------------------------------------------------------
def score(data: dict, out: dict) -> dict:
    held = np.load(data["held"]).astype(np.float64)
    recon = out["recon"].astype(np.float64)
    x, r = held[: data["held_rows"]], recon[: data["held_rows"]]
    row = {
        "nmse": float(((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
        "dead": float((out["fires"] == 0).mean()),
        "l0": float(out["fires"].sum() / len(held)),
    }
    if data["features"] is not None:
        dec = out["decoder"] / np.linalg.norm(out["decoder"], axis=1, keepdims=True)
        best = (data["features"] @ dec.T).max(axis=1)
        row.update(cos=float(best.mean()), recovered=float((best > 0.9).mean()))
    else:
        typical = ~massive_rows(x)
        xt, rt = x[typical], r[typical]
        row["nmse_typical"] = float(((xt - rt) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum())
        row["dce"] = delta_ce(data, recon[data["held_rows"] :])
    return row


def massive_rows(x: np.ndarray) -> np.ndarray:
    """Rows whose norm is over 10x the median: SmolLM2's massive activations (attention-sink tokens,
    e.g. the second "\n" of a context that starts with "\n\n"). In the real held-out rows 7 of 8192
    rows, at ~100x the median norm, hold 94% of the variance, so the plain normalized MSE measures
    how well an SAE reconstructs those 7 rows (saeflow at identical settings, seeds 0 / 1: 0.0173 /
    0.0149; on the other rows 0.2523 / 0.2525)."""
    from sae.train import MASSIVE_NORM

    norms = np.linalg.norm(x, axis=1)
    return norms > MASSIVE_NORM * np.median(norms)


_LM = {}


def delta_ce(data: dict, recon: np.ndarray) -> float:
    from sae.lm import capture, load_lm, logits, replaced
    from sae.metrics import next_token_ce

    spec = data["spec"]
    if "model" not in _LM:
        _LM["model"] = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())[0]
    model, ids = _LM["model"], torch.from_numpy(data["contexts"]).long()
    first = int(spec.data.drop_first_position)
    tail = torch.from_numpy(recon).float().view(ids.shape[0], ids.shape[1] - first, -1)

    def splice(h, _x):
        return torch.cat([h[:, :first], tail.to(h.dtype)], dim=1)

    with torch.no_grad():
        if (key := ("clean", ids.numpy().tobytes())) not in _LM:  # the same contexts at every hookpoint
            _LM[key] = next_token_ce(logits(model, ids), ids).mean().item()
        clean = _LM[key]
        layer = data["hook"].removeprefix("model.layers.")
        if not layer.isdigit():  # a module inside a layer (an MLP): the whole model, the output spliced in
            with replaced(model, data["hook"], splice):
                return next_token_ce(logits(model, ids), ids).mean().item() - clean
        if (key := ("head", data["hook"], ids.numpy().tobytes())) not in _LM:
            _LM[key] = capture(model, ids, [data["hook"]])[data["hook"]][:, :first]
        spliced = torch.cat([_LM[key], tail.to(_LM[key].dtype)], dim=1)
        return next_token_ce(logits_after(model, int(layer), spliced), ids).mean().item() - clean


def logits_after(model, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits with `hidden` as the residual stream after decoder layer `layer`: only the
    layers above it run (the ones below would compute, for every row's dCE, what is replaced). The
    stream enters as inputs_embeds with the layers up to `layer` taken out: positions and the causal
    mask depend on the sequence alone, and a Llama's embeddings are not scaled."""
    layers = model.model.layers
    model.model.layers = layers[layer + 1 :]
    try:
        return model(inputs_embeds=hidden, use_cache=False).logits
    finally:
        model.model.layers = layers


# the grid -------------------------------------------------------------------------------------------
def datasets(args) -> list[tuple[str, list[int], object]]:
    """(name, budgets, loader) of every cell: each real hookpoint at each batch size (one cache of rows
    per hookpoint, shared by its batch sizes; first: the longest, and the issue's), then the synthetic
    regimes."""
    loaded: dict[str, dict] = {}

    def real(hook: str, batch: int) -> dict:
        if hook not in loaded:
            loaded[hook] = real_data(hook)
        name = f"L{hook.rsplit('.', 1)[-1]}/b{batch}"
        return dict(loaded[hook], name=name, shape=dict(loaded[hook]["shape"], batch=batch))

    cells = []
    real_budgets = [int(b) for b in args.real_budgets.split(",")]
    for batch in [int(b) for b in args.batches.split(",")]:  # a batch size across the model, then the next
        for hook in [h for h in REAL_HOOKS if h.rsplit(".", 1)[-1] in args.layers.split(",")]:
            cells.append((f"L{hook.rsplit('.', 1)[-1]}/b{batch}", real_budgets, lambda h=hook, b=batch: real(h, b)))
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else SYNTH_BUDGETS
    for name in [n for n in args.regimes.split(",") if n]:
        grid = WIDE_BUDGETS if name == WIDE_REGIME.name else budgets
        cells.append((name, grid, lambda name=name, grid=grid: synthetic_data(name, max(grid))))
    return cells


def jobs(data: dict, grid: list[int], peers: bool, seeds: int, lr_sweep: str | None, variants=()):
    """(tokens, settings, library, seed, snapshots) of a cell. A peer at its defaults trains once, to
    the largest budget, and is scored at each smaller one on the way (peer_train.py); so does saeflow
    where its settings are the same at several budgets (`budget_groups`), else it trains once per budget."""
    middle = grid[len(grid) // 2]
    real = data["features"] is None
    out = [(g[-1], "defaults", "saeflow", 0, tuple(g[:-1])) for g in budget_groups(data, grid)]
    if peers:
        out += [(grid[-1], "defaults", lib, 0, tuple(grid[:-1])) for lib in ("sparsify", "saelens")]
    # the real cells' seed spread, at the middle budget: saeflow and sparsify (SAELens at its defaults
    # is far behind both in every cell, so its spread decides nothing and would cost a third of the run)
    for seed in range(1, seeds if real else 1):
        out += [(middle, "defaults", lib, seed, ()) for lib in ("saeflow", "sparsify")[: 2 if peers else 1]]
    if not real or data["name"] == TUNING_CELL:  # identical settings: where the defaults were tuned
        out += [(middle, "same", lib, 0, ()) for lib in ("saeflow", "sparsify", "saelens")[: 3 if peers else 1]]
        if peers:  # the old init at the same settings: the cause of saeflow's slow start
            out.append((middle, "same", "saeflow-tied", 0, ()))
    if lr_sweep:
        out += [(t, f"lr x{f}", "saeflow", 0, ()) for t in grid for f in lr_sweep.split(",")]
    for variant in variants:  # like the defaults: one run through the budgets its settings share
        out += [
            (g[-1], variant, "saeflow", 0, tuple(g[:-1])) for g in budget_groups(data, grid, **variant_fields(variant))
        ]
    return out


HEADER = (
    f"{'data':<15} {'tokens':>8} {'settings':<9} {'library':<12} {'seed':>4} {'nMSE':>7} {'cos':>6} "
    f"{'rec>.9':>6} {'dead':>6} {'L0':>6} {'dCE':>6} {'nMSE*':>7} {'sec':>5}"
)


def line(row: dict) -> str:
    return (
        f"{row['data']:<15} {row['tokens']:>8} {row['settings']:<9} {row['library']:<12} {row['seed']:>4} "
        f"{row['nmse']:>7.4f} {row.get('cos', float('nan')):>6.3f} {row.get('recovered', float('nan')):>6.3f} "
        f"{row['dead']:>6.3f} {row['l0']:>6.1f} {row.get('dce', float('nan')):>6.3f} "
        f"{row.get('nmse_typical', float('nan')):>7.4f} {row['seconds']:>5.0f}"
        + (" (sealed run reused)" if row.get("reused") else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default=",".join([*REGIMES, WIDE_REGIME.name]))
    parser.add_argument("--budgets", help="synthetic token budgets, comma-separated (default 131072,524288,1048576)")
    parser.add_argument("--layers", default=",".join(h.rsplit(".", 1)[-1] for h in REAL_HOOKS), help="real layers")
    parser.add_argument("--batches", default=",".join(map(str, REAL_BATCHES)), help="real cells' batch sizes")
    parser.add_argument("--real-budgets", default=",".join(map(str, REAL_BUDGETS)))
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds of the real cells at the middle budget")
    parser.add_argument("--no-real", action="store_true", help="skip SmolLM2's real activations")
    parser.add_argument("--no-peers", action="store_true", help="saeflow only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="development subset: layers 3 and 27 at batches of 4096, budgets 100k and 200k, one seed, "
        "no synthetic regimes",
    )
    parser.add_argument("--peers-python", help="an interpreter that has the peers (default: .bench-peers)")
    parser.add_argument(
        "--fresh-peers",
        action="store_true",
        help="train every peer again, even where a sealed run with the same job, data, code and packages "
        "exists (peer_runs.py)",
    )
    parser.add_argument(
        "--lr-sweep",
        help="also train saeflow at these multiples of its auto lr, comma-separated "
        "(e.g. 0.5,0.7,1.4), at every budget",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also train saeflow with these TrainConfig fields at every budget, e.g. 'aux_coef=0' or "
        "'lr=0.01,aux_k=64' (repeatable; its rows' settings column is the variant)",
    )
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--summary", metavar="JSON", help="print the summary and verdict of a run's --json rows")
    args = parser.parse_args()
    if args.summary:  # a finished (or stopped) run's rows, summarised again without training
        rows = json.loads(Path(args.summary).read_text())
        print(summary(rows))
        print(verdict(rows))
        return
    if args.quick:
        args.regimes, args.layers, args.batches, args.real_budgets, args.seeds = "", "3,27", "4096", "100000,200000", 1
    if args.no_real:
        args.layers = ""
    torch.set_num_threads(2)
    peers = None if args.no_peers else peers_python(args.peers_python)
    work = DATA / "runs"
    work.mkdir(parents=True, exist_ok=True)
    workers = None if peers is None else PeerWorkers(peers, work, fresh=args.fresh_peers)
    rows, reused_runs = [], 0
    start = time.time()
    print(HEADER, flush=True)
    for name, grid, load in datasets(args):
        data = load()
        cell_jobs = jobs(data, grid, peers is not None, args.seeds, args.lr_sweep, args.variant)
        for tokens, settings, lib, seed, snapshots in cell_jobs:
            t0, reused = time.time(), False
            if settings in args.variant:
                outs = run_saeflow(data, tokens, "defaults", 0, snapshots, **variant_fields(settings))
            elif settings.startswith("lr x"):
                lr = float(settings[4:]) * default_lr(data, tokens)
                outs = run_saeflow(data, tokens, "defaults", lr=lr)
            elif lib.startswith("saeflow"):
                tied = {"encoder_init": "tied"} if lib == "saeflow-tied" else {}
                outs = run_saeflow(data, tokens, settings, seed, snapshots, **tied)
            else:
                outs, reused = run_peer(workers, lib, data, tokens, settings, seed, snapshots)
                reused_runs += reused
            seconds = round(time.time() - t0, 1)
            for budget, out in sorted(outs.items()):
                row = dict(data=name, tokens=budget, settings=settings, library=lib, seed=seed, **score(data, out))
                row["seconds"] = seconds if budget == tokens else 0.0  # a snapshot's time is its run's
                row["reused"] = reused
                rows.append(row)
                print(line(row), flush=True)
                if args.json:  # as it goes: a long run stopped early keeps its rows
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"total {time.time() - start:.0f} s" + (f" ({reused_runs} sealed peer runs reused)" if reused_runs else ""))
    if workers is not None:
        workers.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    print(verdict(rows))


def summary(rows: list[dict]) -> str:
    """One line per cell and budget at defaults (seed 0): saeflow beside the better peer, and SAELens."""
    by = {(r["data"], r["tokens"], r["library"]): r for r in rows if r["settings"] == "defaults" and r["seed"] == 0}
    cells = sorted({(r["data"], r["tokens"]) for r in by.values()}, key=lambda c: (cell_order(c[0]), c[1]))
    out = [
        f"{'cell':<15} {'tokens':>7}  {'saeflow: nMSE':>13} {'nMSE*':>7} {'dead':>6} {'dCE':>6}   "
        f"{'sparsify: nMSE':>14} {'nMSE*':>7} {'dead':>6} {'dCE':>6}   {'saelens: nMSE*':>14} {'dead':>6}"
    ]
    for data, tokens in cells:
        cols = []
        for lib in ("saeflow", "sparsify"):
            r = by.get((data, tokens, lib))
            if r is None:
                cols.append(f"{'-':>13} {'-':>7} {'-':>6} {'-':>6}")
                continue
            star = r.get("nmse_typical", r.get("cos", float("nan")))  # synthetic: the mean best cosine
            cols.append(f"{r['nmse']:>13.4f} {star:>7.4f} {r['dead']:>6.1%} {r.get('dce', float('nan')):>6.3f}")
        lens = by.get((data, tokens, "saelens"))
        lens_col = (
            f"{lens.get('nmse_typical', lens['nmse']):>14.4f} {lens['dead']:>6.1%}" if lens else f"{'-':>14} {'-':>6}"
        )
        out.append(f"{data:<15} {tokens:>7}  {cols[0]} {' ' * 2}{cols[1]}   {lens_col}")
    return "\n".join(out)


def cell_order(name: str) -> tuple:
    """Real cells by batch size, then layer ("L3/b4096"); then the synthetic regimes by name."""
    if name.startswith("L") and "/b" in name:
        layer, batch = name[1:].split("/b")
        return (0, int(batch), int(layer), "")
    return (1, 0, 0, name)


def variant_fields(variant: str) -> dict:
    """'aux_coef=0,lr=0.01' -> {'aux_coef': 0, 'lr': 0.01} (values read as JSON, else kept as text)."""
    fields = {}
    for part in variant.split(","):
        key, _, value = part.partition("=")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value.strip()
    return fields


def verdict(rows: list[dict]) -> str:
    """The targets, checked in every cell at defaults (seed 0), then the seed spread of the real cells.

    Every cell: saeflow's normalized MSE at most 0.90x the better peer's (and nMSE* on real data, where
    the plain nMSE is a few massive-activation rows'); real data also: latents dead on the held-out
    rows at most 1%, the CE increase at most the better peer's. Synthetic cells: mean recovery at
    least the better peer's. A margin smaller than the seeds' spread is a tie, not a win."""
    lines = []
    by = {(r["data"], r["tokens"], r["settings"], r["library"], r["seed"]): r for r in rows}
    for (data, tokens, settings, lib, seed), r in by.items():
        if lib != "saeflow" or seed != 0:
            continue
        peers = [by[k] for k in ((data, tokens, settings, p, 0) for p in ("sparsify", "saelens")) if k in by]
        if not peers:
            continue
        best = min(peers, key=lambda p: p["nmse"])
        ratio = r["nmse"] / best["nmse"]
        checks = [ratio <= 0.9]
        text = f"nMSE {ratio:.2f}x the better peer ({best['library']})"
        if "cos" in r:
            checks.append(r["cos"] >= max(p["cos"] for p in peers))
            text += f", cos {r['cos']:.3f} vs {max(p['cos'] for p in peers):.3f}"
        else:
            typical = r["nmse_typical"] / min(p["nmse_typical"] for p in peers)
            dce = min(p["dce"] for p in peers)
            checks += [typical <= 0.9, r["dce"] <= dce, r["dead"] <= 0.01]
            text += f", nMSE* {typical:.2f}x, dCE {r['dce']:.3f} vs {dce:.3f}, dead {r['dead']:.1%}"
        if settings != "defaults":  # identical settings: reported, not a target
            lines.append(f"info {data} {tokens} {settings}: {text}")
            continue
        lines.append(f"{'ok  ' if all(checks) else 'MISS'} {data} {tokens}: {text}")
    lines += spread(rows)
    for (data, tokens, settings, lib, seed), r in by.items():
        swept = [
            s
            for s in rows
            if (s["data"], s["tokens"], s["library"]) == (data, tokens, "saeflow") and s["settings"].startswith("lr x")
        ]
        if settings != "defaults" or lib != "saeflow" or seed != 0 or not swept:
            continue
        best = min(swept + [r], key=lambda s: s["nmse"])
        ratio = r["nmse"] / best["nmse"]
        lines.append(
            f"{'ok  ' if ratio <= 1.1 else 'MISS'} {data} {tokens}: the auto lr's nMSE is {ratio:.2f}x the "
            f"best of the lr sweep ({best['settings'].replace('lr ', '') if best is not r else 'x1'})"
        )
    return "\n".join(lines)


def spread(rows: list[dict]) -> list[str]:
    """Per real cell with several seeds: each library's nMSE* and dCE as mean and range, and whether
    saeflow's lead over the better peer is larger than the ranges (a win) or not (a tie)."""
    out = []
    cells = sorted({(r["data"], r["tokens"]) for r in rows if r["seed"] > 0 and r["settings"] == "defaults"})
    for data, tokens in cells:
        runs = {}
        for r in rows:
            if (r["data"], r["tokens"], r["settings"]) == (data, tokens, "defaults"):
                runs.setdefault(r["library"], []).append(r)
        stats = {  # libraries trained with several seeds here
            lib: {m: (np.mean([r[m] for r in rs]), np.ptp([r[m] for r in rs])) for m in ("nmse", "nmse_typical", "dce")}
            for lib, rs in runs.items()
            if len(rs) > 1
        }
        if "saeflow" not in stats:
            continue
        words = []
        for m, label in (("nmse", "nMSE"), ("nmse_typical", "nMSE*"), ("dce", "dCE")):
            ours = stats["saeflow"][m]
            peer_lib = min((lib for lib in stats if lib != "saeflow"), key=lambda lib: stats[lib][m][0], default=None)
            if peer_lib is None:
                continue
            theirs = stats[peer_lib][m]
            gap = theirs[0] - ours[0]
            call = "win" if gap > max(ours[1], theirs[1]) else "tie" if abs(gap) <= max(ours[1], theirs[1]) else "loss"
            words.append(
                f"{label} {ours[0]:.4f} (range {ours[1]:.4f}) vs {peer_lib} {theirs[0]:.4f} "
                f"(range {theirs[1]:.4f}): {call}"
            )
        n = len(runs["saeflow"])
        out.append(f"seeds {data} {tokens} ({n} seeds): " + "; ".join(words))
    return out


if __name__ == "__main__":
    main()
