"""Sign descent with schedule-free averaging: the default optimizer of the default recipe.

Schedule-free (Defazio et al. 2024, "The Road Less Scheduled") keeps three sequences per parameter:
z takes the optimizer's steps, x is the average of the z's (weighted by lr^2, so uniform at a constant
lr), and the gradient is taken at y = (1 - beta) z + beta x, which the parameter holds in training.
The trained model is x: the averaging does what a decay-to-zero schedule does, without tying the lr
to the run's length. The step on z is sign descent (steepest descent in the max norm), as in
EleutherAI sparsify's default; on the quality benchmark it recovers planted dictionaries better
than Adam at equal tokens (see sae/config.py).

A group with `unit_rows=True` keeps the rows of z at unit norm after each step: the SAE decoder's
constraint, applied to the sequence that takes the steps.
"""

from __future__ import annotations

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, unit_rows=False))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("closures are not supported")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                    state["weight_sum"] = torch.zeros((), dtype=p.dtype, device=p.device)
                z, x = state["z"], state["x"]
                # in place on the gradient (it is not read after the step): one pass less per step
                z.add_(p.grad.sign_(), alpha=-lr)
                if group["unit_rows"]:
                    z.div_(z.norm(dim=1, keepdim=True).clamp_min(1e-12))
                state["weight_sum"].add_(lr * lr)
                # x += c (z - x) with c = lr^2 / sum of lr^2 so far: x is the lr^2-weighted mean of z
                x.lerp_(z, (lr * lr / state["weight_sum"]).clamp(max=1.0))
                torch.lerp(z, x, beta, out=p.data)

    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """The averaged iterate x of a parameter (the parameter itself before its first step)."""
        state = self.state.get(p)
        return state["x"] if state else p.detach()
