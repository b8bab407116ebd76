"""Where a transcoder's dead latents come from, layer by layer: one skip-transcoder per SmolLM2 MLP of
quality_cross_layer.yaml (layers 8-11; 2048 latents, k 32, batches of 1024), trained alone on that
layer's columns of cross_layer_quality.py's cached rows at the defaults and with one lever changed.

    python benchmarks/transcoder_levers.py [--layers 0,1,2,3] [--tokens 200000] [--levers default,...]

Printed per layer: how much of the MLP output's variance its massive rows hold (norm over 10x the
median, as nMSE* counts them), then per lever the FVU on the held-out rows, FVU* without the massive
rows, the latents that fire on none of them, and dCE: SmolLM2's next-token loss increase on the 32
held-out contexts with this layer's MLP output replaced by the prediction (the others exact). The
levers:

- default: the skip connection's lr times sqrt(E||y||^2 without the massive rows / E||y||^2)
  (sae.train.skip_lr_scale: 1 on a layer without massive rows, 1/27 at layer 11);
- plain-skip-lr: the skip's lr the dictionary's, as before that rule: a sign step moves W_skip's
  output by about lr * ||x||_1, as large as a typical target row;
- skip-lr/24: the plain skip lr divided by 24 (sqrt(d));
- robust-scale: the input and target scales from the rows without the massive ones;
- row-weights: each row's squared error weighted by min(1, 100 x median ||y||^2 / ||y||^2);
- adam: the optimizer Adam (its auto lr) instead of sign descent; no-skip: no skip connection.

A lever is a patch of this process's training functions, for measurement only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from cross_layer_quality import cross_layer_data  # noqa: E402
from quality import HELD_ROWS, delta_ce  # noqa: E402

import sae.loss  # noqa: E402
import sae.train  # noqa: E402
from sae import SAEConfig, TrainConfig, train_sae  # noqa: E402
from sae.optim import ScheduleFreeSignSGD  # noqa: E402
from sae.train import massive_rows  # noqa: E402


def fvu(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def skip_lr(factor: float):
    """W_skip in a group of its own whose lr is the schedule's times `factor` (not the data's rule)."""

    def make_optimizer(sae_, tcfg, lr):
        rest = [p for name, p in sae_.named_parameters() if name not in ("W_dec", "W_skip")]
        groups = [
            {"params": [sae_.W_dec], "unit_rows": True, "project_rows": True},
            {"params": rest},
            {"params": [sae_.W_skip], "factor": factor},
        ]
        return ScheduleFreeSignSGD(groups, lr=lr, momentum=tcfg.momentum, triton=tcfg.triton)

    def prepare(self, _prepare=ScheduleFreeSignSGD.prepare):  # after Trainer.step set each group's lr
        for group in self.param_groups:
            group["lr"] *= group.get("factor", 1.0)
        return _prepare(self)

    with patched(sae.train, "make_optimizer", make_optimizer), patched(ScheduleFreeSignSGD, "prepare", prepare):
        yield


def robust_scales(rows: torch.Tensor, cfg) -> torch.Tensor:
    kept = rows.float()[~massive_rows(rows)]
    return torch.tensor(math.sqrt(cfg.d_in / kept.pow(2).sum(-1).mean().item()))


def row_weighted(target: torch.Tensor, recon: torch.Tensor, scale: float) -> torch.Tensor:
    norm2 = target.pow(2).sum(-1).detach()
    weight = (100 * norm2.median() / norm2.clamp_min(1e-12)).clamp(max=1.0)
    return ((target - recon).pow(2).sum(-1) * weight).mean() * scale


LEVERS = {
    "default": lambda: contextlib.nullcontext(),
    "plain-skip-lr": lambda: skip_lr(1.0),
    "skip-lr/24": lambda: skip_lr(1 / 24),
    "robust-scale": lambda: patched(sae.train, "_unit_scales", robust_scales),
    "row-weights": lambda: patched(sae.loss, "sq_err", row_weighted),
    "adam": lambda: contextlib.nullcontext(),
    "no-skip": lambda: contextlib.nullcontext(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,1,2,3", help="indices into the cached MLPs (0: layer 8)")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--levers", default=",".join(LEVERS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = cross_layer_data()
    spec = data["spec"]
    d = spec.d_model_of(data["held"].shape[1])
    L = spec.layers()
    first = int(spec.hookpoints[0].split("+")[0].split(".")[2])
    print(f"{'layer':>5} {'lever':<14} {'FVU':>7} {'FVU*':>7} {'dead':>6} {'dCE':>6}")
    for t in map(int, args.layers.split(",")):
        cols = np.r_[t * d : (t + 1) * d, (L + t) * d : (L + t + 1) * d]
        x = torch.from_numpy(np.ascontiguousarray(data["train"][: args.tokens, cols])).float()
        held = data["held"][:HELD_ROWS][:, cols].float()
        y = held[:, d:]
        big = massive_rows(y)
        share = ((y[big] - y.mean(0)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        print(f"layer {first + t}: {int(big.sum())} massive rows of {len(y)} hold {share:.1%} of the variance")
        for lever in args.levers.split(","):
            cfg = SAEConfig(d, 2048, 32, transcoder=True, skip_connection=lever != "no-skip")
            tcfg = TrainConfig(batch_tokens=1024, tokens=args.tokens, optimizer="adam" if lever == "adam" else None)
            with LEVERS[lever]():
                coder = train_sae(cfg, tcfg, x, progress=False).sae
            with torch.no_grad():
                codes = coder.encode(held[:, :d])
                pred = coder.decode(codes)
                # the CE contexts' MLP outputs, exact but for this layer's, which the coder predicts
                outputs = data["held"][HELD_ROWS:, L * d :].float().clone()
                outputs[:, t * d : (t + 1) * d] = coder.decode(
                    coder.encode(data["held"][HELD_ROWS:, t * d : (t + 1) * d].float())
                )
            fired = (codes.values > 0).flatten().float()
            fires = torch.zeros(cfg.n_latents).index_add_(0, codes.indices.flatten(), fired)
            dead = (fires == 0).float().mean()
            dce = delta_ce(data, outputs.numpy())
            scores = f"{fvu(y, pred):>7.4f} {fvu(y[~big], pred[~big]):>7.4f} {dead:>6.1%} {dce:>6.3f}"
            print(f"{first + t:>5} {lever:<14} {scores}", flush=True)


if __name__ == "__main__":
    main()
