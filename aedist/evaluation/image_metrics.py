"""Image-quality measures of a batch, one value per image (or one distance per set of features):
SSIM, MS-SSIM, LPIPS, the Fréchet distance. Pure functions of tensors; ``quality.py`` sums them over
batches and ranks. Images are ``[B, C, H, W]`` in [0, 1] (data range 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from scipy import linalg
from torch import Tensor

from aedist.errors import UserError
from aedist.evaluation.backbones import load_backbone

SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
LPIPS_MIN_SIDE = {"alex": 32, "vgg": 16}  # AlexNet's pooling needs >= 31 px, VGG's four poolings 16


def quantize_8bit(x: Tensor) -> Tensor:
    """What a PNG of ``x`` holds: clamp to [0, 1], round to 1/255 steps (float32)."""
    return torch.round(x.float().clamp(0.0, 1.0) * 255.0) / 255.0


def rgb(x: Tensor) -> Tensor:
    """[B, 1 or 3, H, W] -> [B, 3, H, W]: the pretrained nets take RGB; greyscale is repeated."""
    if x.shape[1] not in (1, 3):
        raise UserError(f"eval.metrics lpips and rfid take greyscale or RGB images, got {x.shape[1]} channels; remove them from eval.metrics")
    return repeat(x, "b 1 h w -> b c h w", c=3) if x.shape[1] == 1 else x


def _torchmetrics_ssim(pred: Tensor, target: Tensor, **mode: bool) -> tuple[Tensor, Tensor]:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(pred, target, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW,
                                               reduction="none", data_range=1.0, k1=SSIM_K[0], k2=SSIM_K[1], **mode)


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM ``[B]`` of images ``[B, C, H, W]`` in [0, 1] (data range 1; Gaussian 11x11,
    sigma 1.5, k1 0.01, k2 0.03): the mean of torchmetrics' SSIM map over channels and pixels, without
    the 5-px border that its reflection padding invents (scikit-image and pytorch-msssim leave it out too)."""
    _need_side(pred, SSIM_WINDOW, "ssim")
    return _border_free_mean(_torchmetrics_ssim(pred, target, return_full_image=True)[1])


def _border_free_mean(full: Tensor) -> Tensor:
    p = SSIM_WINDOW // 2
    return reduce(full[..., p:-p, p:-p], "b c h w -> b", "mean")


def ms_ssim_scales(height: int, width: int) -> int:
    """Scales MS-SSIM uses for an image: the most (<= 5) whose coarsest scale still holds the 11-px
    window, i.e. short side > 10 * 2^(n-1): 5 from 161 px, 4 from 81, 3 from 41, 2 from 21. UserError under 21 px."""
    side = min(height, width)
    fits = [n for n in range(2, len(MS_SSIM_BETAS) + 1) if side > (SSIM_WINDOW - 1) * 2 ** (n - 1)]
    if not fits:
        raise UserError(f"eval.metrics 'ms_ssim' needs images of at least 21x21 px for 2 scales, got {height}x{width}; "
                        "remove ms_ssim from eval.metrics (ssim works from 11 px)")
    return max(fits)


def ms_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image MS-SSIM ``[B]`` of images ``[B, C, H, W]`` in [0, 1]: :func:`ms_ssim_scales` scales,
    the standard betas truncated to them and renormalized to sum 1; contrast-structure at the finer
    scales and SSIM at the coarsest (both from torchmetrics' SSIM, border-free, negative values set to 0),
    2x2 average pooling between scales (an odd last row/column averaged on its own). Computed per
    channel, then averaged over channels, as pytorch-msssim does."""
    n = ms_ssim_scales(*pred.shape[-2:])
    betas = [b / sum(MS_SSIM_BETAS[:n]) for b in MS_SSIM_BETAS[:n]]
    x, y = (rearrange(v, "b c h w -> (b c) 1 h w") for v in (pred, target))
    value = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for level, beta in enumerate(betas):
        if level < n - 1:
            term = _torchmetrics_ssim(x, y, return_contrast_sensitivity=True)[1]
            x, y = (F.avg_pool2d(v, 2, ceil_mode=True) for v in (x, y))
        else:
            term = _border_free_mean(_torchmetrics_ssim(x, y, return_full_image=True)[1])
        value = value * term.double().clamp_min(0.0) ** beta
    return reduce(value, "(b c) -> b", "mean", b=pred.shape[0])


def lpips_distance(pred: Tensor, target: Tensor, net: str = "alex") -> Tensor:
    """Per-image LPIPS ``[B]`` of images ``[B, C, H, W]`` in [0, 1]: scaled to [-1, 1], greyscale
    repeated to RGB; images whose short side is under what the trunk needs (32 px AlexNet, 16 VGG)
    are upsampled bilinearly to it first."""
    lp = load_backbone("lpips", net, pred.device)
    a, b = rgb(pred), rgb(target)
    side = min(a.shape[-2:])
    if side < LPIPS_MIN_SIDE[net]:
        size = [round(s * LPIPS_MIN_SIDE[net] / side) for s in a.shape[-2:]]
        a, b = (F.interpolate(v, size=size, mode="bilinear", align_corners=False) for v in (a, b))
    return rearrange(lp(a * 2 - 1, b * 2 - 1), "b ... -> b (...)").mean(dim=1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrtm(S1 S2)) of two Gaussians (scipy's sqrtm; a singular
    product gets 1e-6 on the diagonals, and the imaginary round-off is dropped, as pytorch-fid does)."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        eye = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eye) @ (sigma2 + eye))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean.real))


def _need_side(x: Tensor, side: int, name: str) -> None:
    if min(x.shape[-2:]) < side:
        raise UserError(f"eval.metrics '{name}' needs images of at least {side}x{side} px, got {x.shape[-2]}x{x.shape[-1]}; "
                        f"remove {name} from eval.metrics")


def check_image_size(metric_names: Sequence[str], height: int, width: int) -> None:
    """UserError when ``ssim`` (11 px) or ``ms_ssim`` (21 px) is asked for on smaller images."""
    if "ssim" in metric_names:
        _need_side(torch.empty(0, 0, height, width), SSIM_WINDOW, "ssim")
    if "ms_ssim" in metric_names:
        ms_ssim_scales(height, width)
