"""Full-reference image quality: PSNR and SSIM of images in [0, 1] (pure tensor functions).

Shared by the SR benchmark, the Hybrid SR controller's profiling and anything else that
compares an image with its ground truth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr_db", "ssim"]


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR of images in [0, 1] (whole batch pooled); ``x`` is clamped to [0, 1] first."""
    mse = float(F.mse_loss(x.clamp(0, 1), y))
    return 10 * math.log10(1 / max(mse, 1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5) of [B, C, H, W] in [0, 1]."""
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    c = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous().double()

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=c)

    x, y = x.clamp(0, 1).double(), y.double()
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
