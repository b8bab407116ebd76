"""Trains one SAE with a peer library's own code, inside the peers' venv (.bench-peers/).

    python peer_train.py JOB.json
    python peer_train.py --serve     # job paths on stdin, one per line; "ok" or "error ..." per job
    python peer_train.py --check-snapshots JOB.json

JOB names the library (sparsify | saelens), the settings (`defaults`, or `adam` with an explicit
lr / schedule / AuxK shared by every library), the shape, the token budget and the data: a float16
.npy file of training rows (read in order, batch after batch) and one of held-out rows. It writes
the held-out reconstructions, the decoder rows and each latent's firing count on the held-out rows
as .npy files next to JOB, for the common scorer. With `snapshots` (budgets below `tokens`) it also
writes them as the SAE is after each of those budgets, as JOB.<tokens>.*.npy: at the peers' default
settings nothing depends on the budget (a constant lr, no budget-relative window), so a run of
`tokens` passes through exactly the states of the shorter runs (checked: `--check-snapshots`).

- sparsify 1.3.3: its Trainer needs a Hugging Face model, so this runs the body of its training
  step on the given activations, with its own classes and defaults: SparseCoder (encoder = a default
  nn.Linear, decoder = its transpose at unit norm, zero encoder bias), b_dec set to the first batch's
  mean, the FVU loss normalised per batch, AuxK weight 0 (its default auxk_alpha), gradient parallel
  to the decoder rows removed, decoder renormalised; optimizer signum = ScheduleFreeWrapper(SignSGD,
  momentum 0.95) at lr 5e-3 / sqrt(n / 2^14), evaluated at the schedule-free average.
  A transcoder job (`transcode`, with `skip`: a skip-transcoder) reads [input | output] rows and
  does what sparsify's Trainer does for `--transcode`: SparseCoderConfig(transcode, skip_connection),
  encoder bias = -W_enc mean(input) and b_dec = mean(output) of the first batch, no decoder
  normalisation, forward(x, y).
- SAELens 6.54: its own SAETrainer over TopKTrainingSAE with its defaults (lr 3e-4 constant, Adam,
  AuxK coefficient 1, dead window 1000 steps), fed by a data provider of the same batches.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def batches(path: str, batch: int, tokens: int, before=lambda seen: None):
    """The rows in order, pass after pass, until `tokens` (the same batches saeflow's train_sae makes);
    `before(seen)` runs before each batch is handed out, once the steps of the `seen` tokens are done."""
    rows = np.load(path, mmap_mode="r")
    seen = 0
    while seen < tokens:
        for start in range(0, len(rows), batch):
            if seen >= tokens:
                return
            before(seen)
            x = torch.from_numpy(np.asarray(rows[start : start + batch], dtype=np.float32))
            seen += len(x)
            yield x


def held_rows(job: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(job["held"]).astype(np.float32))


def train_sparsify(job: dict, snapshot):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    d, n, k = job["d"], job["n_latents"], job["k"]
    transcode = job.get("transcode", False)
    torch.manual_seed(job["seed"])
    config = SparseCoderConfig(num_latents=n, k=k, transcode=transcode, skip_connection=job.get("skip", False))
    sae = SparseCoder(d, config, device="cpu", dtype=torch.float32)
    steps = job["tokens"] // job["batch"]
    if job["settings"] == "defaults":
        opt = ScheduleFreeWrapper(
            SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (n / 2**14) ** 0.5}]), momentum=0.95
        )
        opt.train()
        sched, aux_alpha = None, 0.0
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=job["lr"], eps=6.25e-10)
        sched = _linear_schedule(opt, job["warmup_steps"], steps)
        aux_alpha = job["aux_coef"]
    since_fired = torch.zeros(n, dtype=torch.long)
    held = held_rows(job)[:, :d]  # a transcoder's: the input half

    def outputs(sae, opt):
        if sched is None:  # the schedule-free average, as sparsify saves it (on a copy: training goes on)
            sae, opt = copy.deepcopy((sae, opt))
            opt.eval()
        with torch.no_grad():
            out = sae(held)
            codes = torch.zeros(len(held), n).scatter_(1, out.latent_indices, out.latent_acts)
        return out.sae_out, sae.W_dec.detach(), codes

    data = batches(job["train"], job["batch"], job["tokens"], lambda seen: snapshot(seen, lambda: outputs(sae, opt)))
    for step, rows in enumerate(data):
        x, y = (rows[:, :d], rows[:, d:]) if transcode else (rows, rows)
        if step == 0:
            if transcode:
                sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0)
        dead = since_fired > job["dead_tokens"] if aux_alpha > 0 else None
        out = sae(x, y if transcode else None, dead_mask=dead)
        (out.fvu + aux_alpha * out.auxk_loss).backward()
        if not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
        if not transcode:
            sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
    return outputs(sae, opt)


def _linear_schedule(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_saelens(job: dict, snapshot):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, n, k = job["d"], job["n_latents"], job["k"]
    torch.manual_seed(job["seed"])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))
    extra = {"lr_end": 3e-4 / 10}  # what SAELens' runner config sets after init: lr / 10
    if job["settings"] != "defaults":
        sae.cfg.aux_loss_coefficient = job["aux_coef"]
        steps = job["tokens"] // job["batch"]
        extra = dict(
            dead_feature_window=max(1, job["dead_tokens"] // job["batch"]),
            lr=job["lr"],
            lr_scheduler_name="constant",
            lr_warm_up_steps=job["warmup_steps"],
            lr_decay_steps=steps - job["warmup_steps"],
            lr_end=0.0,
        )
    cfg = SAETrainerConfig(total_training_samples=job["tokens"], train_batch_size_samples=job["batch"], **extra)
    held = held_rows(job)

    def outputs():
        with torch.no_grad():
            codes = sae.encode(held)
            return sae.decode(codes), sae.W_dec.detach().clone(), codes

    SAETrainer(cfg, sae, batches(job["train"], job["batch"], job["tokens"], lambda seen: snapshot(seen, outputs))).fit()
    return outputs()


def run_job(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    wanted = sorted(job.get("snapshots", ()))
    if wanted and job["settings"] != "defaults":
        raise ValueError("snapshots are exact only at the default settings (the others' schedules span the budget)")

    def snapshot(seen: int, outputs) -> None:
        """A run of budget b stops at the first batch boundary at or past b."""
        while wanted and seen >= wanted[0]:
            save(job_path.with_suffix(f".{wanted.pop(0)}.json"), *outputs())

    save(job_path, *{"sparsify": train_sparsify, "saelens": train_saelens}[job["library"]](job, snapshot))


def save(job_path: Path, recon: torch.Tensor, decoder: torch.Tensor, codes: torch.Tensor) -> None:
    np.save(job_path.with_suffix(".recon.npy"), recon.numpy())
    np.save(job_path.with_suffix(".decoder.npy"), decoder.numpy())
    np.save(job_path.with_suffix(".fires.npy"), (codes > 0).sum(0).numpy())


def serve() -> None:
    """One process for many jobs: the libraries' imports (5-8 s each) are paid once per benchmark.
    Replies go to the original stdout; anything the libraries print goes to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            run_job(Path(line.strip()))
            replies.write("ok\n")
        except Exception as e:  # reported to the benchmark, which stops with it
            replies.write("error " + " ".join(f"{type(e).__name__}: {e}".split()) + "\n")
        replies.flush()


def check_snapshots(job_path: Path) -> None:
    """Runs JOB (with its `snapshots`), then each snapshot's budget as a run of its own, and prints the
    largest difference between their held-out reconstructions and decoders (0: the same states)."""
    job = json.loads(job_path.read_text())
    run_job(job_path)
    for budget in job["snapshots"]:
        alone = job_path.with_name(f"{job_path.stem}-alone-{budget}.json")
        alone.write_text(json.dumps(dict(job, tokens=budget, snapshots=[])))
        run_job(alone)
        passed = job_path.with_suffix(f".{budget}.json")
        diffs = {}
        for key in ("recon", "decoder", "fires"):
            a, b = (np.load(p.with_suffix(f".{key}.npy")).astype(np.float64) for p in (alone, passed))
            diffs[key] = float(np.abs(a - b).max())
        print(f"{job['library']} {budget} of {job['tokens']}: largest differences {diffs}", flush=True)


def main() -> None:
    if sys.argv[1] == "--serve":
        serve()
    elif sys.argv[1] == "--check-snapshots":
        check_snapshots(Path(sys.argv[2]))
    else:
        run_job(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
