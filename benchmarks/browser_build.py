"""Cost of the evaluation's feature side on the demo: probe loss, N2G and the all-latent browser.

    python benchmarks/browser_build.py [--latents 4096,32768] [--train-tokens 65536]

For each width an SAE is trained briefly on the demo's cached activations (specs/demo.yaml; cached on
first use), then timed: encoding the held-out contexts with the N2G explanations and logit effects
(`collect_features`), the probe loss over its tasks, and writing the browser; the browser's size on
disk, its file count, what opening the page loads (all but the latent shards) and the mean shard
are measured. Prints one row per width.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    from flows.spec import load_spec
    from flows.stages import eval_source, store_url, write_browser
    from sae import SAEConfig, TrainConfig, train_sae
    from sae.evaluation import EvalRecord, collect_features
    from sae.lm import load_lm
    from sae.probes import probe_metrics, task_labels
    from storage import activations as store
    from storage import reading

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", default="4096,32768")
    parser.add_argument("--train-tokens", type=int, default=65536)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = load_spec(HERE.parent / "specs" / "demo.yaml")
    hook = spec.hookpoints[0]
    if not store.is_complete(store_url(spec)):
        subprocess.run(
            [str(Path(sys.executable).parent / "saeflow"), "cache", "specs/demo.yaml"], check=True, cwd=HERE.parent
        )
    group = store.open_store(store_url(spec), verify=True)
    rows = torch.cat(list(reading.iter_rows(store.activations(group, "train", hook), 65536, stop=args.train_tokens)))
    lm = load_lm(spec.model.source, spec.model.dtype, "cpu", spec.converted_model_dir())
    source = eval_source(group, hook, lambda: lm)
    plan = spec.eval.plan()
    print(
        f"{'latents':>8} {'tokens':>7} {'features s':>10} {'probes s':>9} {'build s':>8} {'files':>6} {'MB':>7} "
        f"{'page MB':>8} {'shard kB':>9}",
        flush=True,
    )
    for n in [int(x) for x in args.latents.split(",")]:
        sae = train_sae(
            SAEConfig(rows.shape[1], n, spec.sae[0].k),
            TrainConfig(batch_tokens=1024, tokens=len(rows)),
            rows,
            progress=False,
        ).sae.eval()
        t0 = time.time()
        sample, acts = collect_features(sae, plan, source)
        t1 = time.time()
        texts = [[sample.token_text(int(t)) for t in c] for c in sample.tokens]
        labels = {k: v.reshape(-1) for k, v in task_labels(texts, sample.first_position).items()}
        n_train = len(sample.tokens) // 2 * source.positions
        probe_metrics(labels, (torch.from_numpy(sample.values), torch.from_numpy(sample.indices)), acts, n, n_train)
        t2 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            index = write_browser(EvalRecord({}, sample), n, Path(tmp), f"demo, {n} latents")
            t3 = time.time()
            found = [p for p in index.parent.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in found) / 2**20
            # what opening the page loads (everything but the shards), and one shard
            shards = [p for p in found if p.parent.name == "latents"]
            page = (sum(p.stat().st_size for p in found) - sum(p.stat().st_size for p in shards)) / 2**20
            shard = sum(p.stat().st_size for p in shards) / len(shards) / 2**10
        print(
            f"{n:>8} {len(acts):>7} {t1 - t0:>10.1f} {t2 - t1:>9.1f} {t3 - t2:>8.1f} {len(found):>6} {size:>7.1f} "
            f"{page:>8.1f} {shard:>9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
