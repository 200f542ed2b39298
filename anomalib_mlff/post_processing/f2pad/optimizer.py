"""F2PAD's optimiser (paper III-D): Adan with local gradient sharing and a per-pixel step size.

Each iteration:
1. gradient of J per pixel;
2. local sharing (Eq. 13-14): every free pixel's direction is the bilateral-weighted mean of the
   gradients of the free pixels around it (spatial and colour Gaussians, colours of the observed
   image, weights normalised to sum 1 over the free neighbours);
3. clipping of each component to +-``clip``;
4. a step of timm's Adan on that direction;
5. the step of each pixel scaled by ``1 + boost / (1 + |A_ij| / eps)`` (Eq. 15): up to ``1 + boost``
   where the anomalous part is near zero, where gradients are small;
6. projection onto valid pixels, [0, 1], and back to the observed values outside the region.
An image stops when its best objective value improved by less than ``tolerance`` per iteration,
averaged over the last ``patience`` iterations (the paper's rule is ``patience=1`` on the raw value,
which Adan's first, sign-like steps trip at once); it keeps its best estimate. The loop ends when
all images have stopped or after ``max_iterations``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from kornia.filters import joint_bilateral_blur
from timm.optim import Adan


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyper-parameters of the optimiser (defaults: the paper's, mapped to [0, 1] pixels)."""

    lr: float = 0.01
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99)
    clip: float = 0.03
    kernel_size: int = 5
    sigma_space: float = 1.0
    sigma_color: float = 0.25
    boost: float = 3.0
    eps: float = 0.05
    tolerance: float = 0.05
    max_iterations: int = 1200
    patience: int = 10
    min_iterations: int = 0


def share_gradients(
    gradient: torch.Tensor,
    guidance: torch.Tensor,
    region: torch.Tensor,
    kernel_size: int,
    sigma_space: float,
    sigma_color: float,
) -> torch.Tensor:
    """Bilateral-weighted mean of the gradients of the free neighbours of every free pixel.

    ``gradient`` and ``guidance`` are ``(B, C, H, W)``, ``region`` ``(B, H, W)``; zero outside the region.
    Dividing the filtered gradient by the filtered region mask normalises the weights over the free
    neighbours only, so they sum to 1 there.
    """
    free = region[:, None].to(gradient.dtype)
    space = (sigma_space, sigma_space)
    weighted = joint_bilateral_blur(
        gradient * free, guidance, kernel_size, sigma_color, space, color_distance_type="l2"
    )
    weights = joint_bilateral_blur(free, guidance, kernel_size, sigma_color, space, color_distance_type="l2")
    return torch.where(free > 0, weighted / weights.clamp_min(1e-12), torch.zeros_like(gradient))


def step_scale(anomalous_part: torch.Tensor, boost: float, eps: float) -> torch.Tensor:
    """Per-pixel step multiplier ``1 + boost / (1 + |A_ij| / eps)``, ``(B, 1, H, W)``."""
    magnitude = torch.linalg.vector_norm(anomalous_part, dim=1, keepdim=True)
    return 1 + boost / (1 + magnitude / eps)


@dataclass
class OptimisationTrace:
    """What a run did: objective per iteration (``(T, B)``) and iterations each image ran."""

    values: torch.Tensor
    iterations: torch.Tensor


def minimise(
    objective: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    observed: torch.Tensor,
    region: torch.Tensor,
    settings: OptimizerSettings,
    share: bool = True,
) -> tuple[torch.Tensor, OptimisationTrace]:
    """Minimise ``objective`` (one value per image) over the pixels of ``region``, starting at ``start``.

    Returns the final normal-image estimate and the trace. ``share=False`` gives plain Adan with the
    other steps unchanged (for comparisons).
    """
    free = region[:, None].to(start.dtype)
    estimate = torch.where(free > 0, start, observed).clamp(0, 1).detach().requires_grad_(True)
    optimiser = Adan([estimate], lr=settings.lr, betas=settings.betas)
    batch = start.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=start.device)
    iterations = torch.zeros(batch, dtype=torch.long, device=start.device)
    best = torch.full((batch,), float("inf"), dtype=start.dtype, device=start.device)
    best_estimate = estimate.detach().clone()
    best_seen: list[torch.Tensor] = []
    values_seen: list[torch.Tensor] = []
    for iteration in range(settings.max_iterations + 1):
        values = objective(estimate)
        with torch.no_grad():
            improved = values < best
            best = torch.where(improved, values, best)
            best_estimate[improved] = estimate[improved]
            values_seen.append(values.detach())
            best_seen.append(best.clone())
            if iteration >= max(settings.patience, settings.min_iterations):
                gain = (best_seen[-1 - settings.patience] - best) / settings.patience
                active &= gain >= settings.tolerance
        if iteration == settings.max_iterations or not active.any():
            break
        (gradient,) = torch.autograd.grad(values.sum(), estimate)
        with torch.no_grad():
            if share:
                gradient = share_gradients(
                    gradient, observed, region, settings.kernel_size, settings.sigma_space, settings.sigma_color
                )
            estimate.grad = gradient.clamp(-settings.clip, settings.clip) * free
            before = estimate.detach().clone()
            optimiser.step()
            moving = free * active[:, None, None, None].to(free.dtype)
            change = (estimate - before) * step_scale(observed - before, settings.boost, settings.eps) * moving
            estimate.copy_((before + change).clamp(0, 1))
            estimate.grad = None
        iterations += active.long()
    return best_estimate, OptimisationTrace(torch.stack(values_seen), iterations)
