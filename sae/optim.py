"""Sign descent with schedule-free averaging: the default optimizer of the default recipe.

Schedule-free (Defazio et al. 2024, "The Road Less Scheduled") keeps three sequences per parameter:
z takes the optimizer's steps, x is the average of the z's (weighted by lr^2, so uniform at a constant
lr), and the gradient is taken at y = (1 - beta) z + beta x, which the parameter holds in training.
The trained model is x: the averaging does what a decay-to-zero schedule does, without tying the lr
to the run's length. The step on z is sign descent (steepest descent in the max norm), as in
EleutherAI sparsify's default; on the quality benchmark it recovers planted dictionaries better
than Adam at equal tokens (see sae/config.py).

A group with `block_lr_scales` (a list of L numbers) divides each parameter's rows into L equal
blocks and multiplies block l's step by its number: a cross-layer skip-transcoder's W_skip, one
(d, d) block per layer, each with its own layer's skip lr (sae.train.skip_lr_scale).

A group with `unit_rows=True` keeps the rows of z at unit norm after each step: the SAE decoder's
constraint, applied to the sequence that takes the steps. With `project_rows=True` as well, the step
first removes from each row's gradient its component along the row (the decoder gradient
projection, §A.1), in the same pass on the Triton path.

Only z is kept as state: the parameter holds y, and x = (y - (1 - beta) z) / beta follows from the
two (as in Defazio et al.'s reference code). With c the step's averaging weight, the step is
y <- (1 - c) y - (1 - c)(1 - beta) z_old + (1 - beta + beta c) z_new: one float32 copy of the
weights less than keeping x, which is a quarter of training memory (weights, gradients, z, x).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _triton_optim():
    try:
        from sae import triton_optim
    except ImportError:  # no triton: the foreach form serves every device
        return None
    return triton_optim


def _optim_kernel():
    module = _triton_optim()
    if module is None:
        raise RuntimeError("the optimizer's Triton kernel was chosen, but triton is not installed")
    return module


def _fused(params: list[torch.Tensor], triton: bool = True) -> bool:
    """One Triton kernel per parameter on CUDA (float32, contiguous), unless triton is False."""
    return (
        triton
        and all(p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() for p in params)
        and _triton_optim() is not None
    )


def project_rows_(grad: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: removes from each row of grad its component along the same row of `rows` (unit
    rows; the decoder gradient projection, §A.1)."""
    grad.sub_((grad * rows).sum(dim=1, keepdim=True) * rows)


def scale_row_blocks_(t: torch.Tensor, scales: list[float]) -> None:
    """In place: the rows of t in len(scales) equal blocks, block l multiplied by scales[l]."""
    t.unflatten(0, (len(scales), -1)).mul_(torch.tensor(scales, dtype=t.dtype, device=t.device).view(-1, 1, 1))


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """`step()` is `prepare()` (host: this step's lr and averaging weight) then `apply()` (device
    work only, reading them from a device tensor on the Triton path), so that a CUDA graph can
    capture `apply` and replay it with each step's values (sae/cuda_graph.py)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, triton: bool = True):
        if not lr > 0 or not 0 < momentum < 1:  # momentum 0 would leave x unrecoverable from y and z
            raise ValueError(f"need lr > 0 and 0 < momentum < 1, got lr={lr}, momentum={momentum}")
        # weight_sum (sum of lr^2 so far) lives in the group: a plain float, saved with the groups
        super().__init__(params, dict(lr=lr, momentum=momentum, unit_rows=False, project_rows=False, weight_sum=0.0))
        self._step_values: list[tuple[float, float]] = []  # per group, from prepare
        self._hyper: dict[int, torch.Tensor] = {}  # per group: (lr, avg) on the device, for the kernel
        self.triton = triton  # False: the foreach form on CUDA too (the reference)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("closures are not supported")
        self.prepare()
        self.apply()

    @torch.no_grad()
    def prepare(self) -> None:
        """Host side of a step: state for new parameters, the lr^2 sum, and (lr, avg) per group,
        written to the device for the Triton kernel (a fill, no host sync)."""
        self._step_values = []
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
            lr = group["lr"]
            group["weight_sum"] += lr * lr
            avg = min(1.0, lr * lr / group["weight_sum"])  # x is the lr^2-weighted mean of z
            self._step_values.append((lr, avg))
            if self.fused_group(group):
                hyper = self._hyper.get(i)
                if hyper is None:
                    hyper = self._hyper[i] = torch.empty(2, dtype=torch.float32, device=group["params"][0].device)
                hyper[0].fill_(lr)
                hyper[1].fill_(avg)

    @torch.no_grad()
    def apply(self) -> None:
        """Device side of a step: the update of every parameter with a gradient."""
        for i, (group, (lr, avg)) in enumerate(zip(self.param_groups, self._step_values)):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta = group["momentum"]
            zs = [self.state[p]["z"] for p in params]
            if self.fused_group(group):
                for p, z in zip(params, zs):
                    _optim_kernel().sign_free_step(
                        p,
                        z,
                        self._hyper[i],
                        beta,
                        group["unit_rows"] and p.dim() == 2,
                        group.get("project_rows", False) and p.dim() == 2,
                    )
                continue
            # foreach: a few kernels per group, not per parameter, and no temporaries: sign in place on
            # the gradients (not read after the step); y takes its z_old term before z moves
            grads = [p.grad for p in params]
            if group.get("project_rows", False):
                for p, g in zip(params, grads):
                    if p.dim() == 2:
                        project_rows_(g, p)
            torch._foreach_mul_(params, 1 - avg)
            torch._foreach_add_(params, zs, alpha=-(1 - avg) * (1 - beta))
            torch._foreach_sign_(grads)
            if "block_lr_scales" in group:
                for g in grads:
                    scale_row_blocks_(g, group["block_lr_scales"])
            torch._foreach_add_(zs, grads, alpha=-lr)
            if group["unit_rows"]:
                for z in zs:
                    z.div_(z.norm(dim=1, keepdim=True).clamp_min(1e-12))
            torch._foreach_add_(params, zs, alpha=1 - beta + beta * avg)

    def fused(self, params: list[torch.Tensor]) -> bool:
        """Whether these parameters take the one-pass Triton kernel, which reads the lr on the device."""
        return _fused(params, self.triton)

    def fused_group(self, group: dict) -> bool:
        """Whether a group takes the Triton kernel: not with block lr scales (the kernel has one lr)."""
        return "block_lr_scales" not in group and self.fused(group["params"])

    def reads_lr_on_device(self) -> bool:
        """Whether every group's step reads its lr and averaging weight on the device (a CUDA graph
        replays them with each step's values; the foreach form would keep the captured ones)."""
        return all(self.fused_group(group) for group in self.param_groups)

    @torch.no_grad()
    def restart_rows(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        """After rows of p were set anew (sae.resample): z takes them too, so that y, z and the
        averaged x = (y - (1 - beta) z) / beta all start from them."""
        state = self.state.get(p)
        if state:  # else z is taken from p at its first step
            state["z"][rows] = p[rows]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state.pop("x", None)  # kept by checkpoints of earlier versions: implied by y and z

    @torch.no_grad()
    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """The averaged iterate x of a parameter, (y - (1 - beta) z) / beta (the parameter itself
        before its first step); a new tensor."""
        state = self.state.get(p)
        if not state:
            return p.detach().clone()
        beta = next(g["momentum"] for g in self.param_groups if any(q is p for q in g["params"]))
        return (p.detach() - (1 - beta) * state["z"]) / beta
