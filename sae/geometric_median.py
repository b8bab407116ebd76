"""Geometric median by Weiszfeld's iterations: b_pre's initial value (§A.1)."""

from __future__ import annotations

import torch


def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y sum_i ||points_i - y||, for points of shape (N, d), computed in float64."""
    p = points.double()
    y = p.mean(dim=0)
    for _ in range(max_iter):
        # clamp: a point that coincides with y would get infinite weight
        w = 1.0 / (p - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * p).sum(dim=0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * (1.0 + y.norm()):
            break
    return y.to(points.dtype)
