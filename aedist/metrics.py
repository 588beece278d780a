"""Evaluation metrics: reconstruction error (MSE, PSNR, SNR), latent kNN accuracy, latent Gaussianity.

Reconstruction metrics come in two halves so that they stay exact across batches and ranks:

    total = None
    for clean, inp in batches:
        total = accumulate(total, batch_sums(model(inp)[0], clean))
    # on several ranks: all-reduce (sum) every tensor of ``total`` first
    finalize(total, "test")   # {"test/mse": …, "test/psnr_db": …, "test/snr_db": …}

Everything here is plain torch / scikit-learn: no Accelerator, no W&B.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from torch import Tensor

# Floors that keep a perfect reconstruction (or a black target) from producing ±inf, which would
# poison a mean over images; 1e-10 MSE caps PSNR at 100 dB for data range 1.
MSE_FLOOR = 1e-10
POWER_FLOOR = 1e-20

SUM_KEYS = ("sq_err", "n_pixels", "n_images", "signal_power", "psnr_sum", "snr_sum")


def batch_sums(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-batch sums that add up exactly over batches and ranks.

    Args:
        pred: reconstructions ``[B, ...]`` (e.g. ``[B, C, H, W]``), values in the data range [0, 1].
        target: clean images, same shape as ``pred``.

    Returns:
        0-d float64 tensors on ``pred``'s device:
        ``sq_err`` Σ (target − pred)², ``n_pixels`` number of elements, ``n_images`` B,
        ``signal_power`` Σ target², ``psnr_sum`` Σ_images 10·log10(1 / max(MSE_i, 1e-10)),
        ``snr_sum`` Σ_images 10·log10(Σ_i target² / Σ_i (target − pred)²) (both powers floored at 1e-20).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [B, ...], got shape {tuple(pred.shape)}")
    # float64 so that sums over a whole test set (≈10^7 pixels) lose nothing, even from bf16 inputs.
    p = pred.detach().to(torch.float64).flatten(1)
    t = target.detach().to(device=pred.device, dtype=torch.float64).flatten(1)
    err = (t - p).square().sum(dim=1)  # [B]
    sig = t.square().sum(dim=1)  # [B]
    per_image_mse = (err / p.shape[1]).clamp_min(MSE_FLOOR)
    psnr = 10.0 * torch.log10(1.0 / per_image_mse)
    snr = 10.0 * (torch.log10(sig.clamp_min(POWER_FLOOR)) - torch.log10(err.clamp_min(POWER_FLOOR)))
    return {
        "sq_err": err.sum(),
        "n_pixels": torch.tensor(float(p.numel()), dtype=torch.float64, device=pred.device),
        "n_images": torch.tensor(float(p.shape[0]), dtype=torch.float64, device=pred.device),
        "signal_power": sig.sum(),
        "psnr_sum": psnr.sum(),
        "snr_sum": snr.sum(),
    }


def accumulate(total: dict[str, Tensor] | None, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``sums`` (from :func:`batch_sums`) into ``total``; ``total=None`` starts a new tally."""
    if total is None:
        return {k: v.clone() for k, v in sums.items()}
    return {k: total[k] + sums[k] for k in SUM_KEYS}


def finalize(sums: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """Turn (all-reduced) sums into metrics.

    Returns ``{prefix}/mse`` (mean over all pixels), ``{prefix}/psnr_db`` and ``{prefix}/snr_db``
    (means of the per-image values, in dB). All are NaN when no image was counted.
    """
    n_img = float(sums["n_images"])
    n_pix = float(sums["n_pixels"])
    if n_img <= 0 or n_pix <= 0:
        nan = float("nan")
        return {f"{prefix}/mse": nan, f"{prefix}/psnr_db": nan, f"{prefix}/snr_db": nan}
    return {
        f"{prefix}/mse": float(sums["sq_err"]) / n_pix,
        f"{prefix}/psnr_db": float(sums["psnr_sum"]) / n_img,
        f"{prefix}/snr_db": float(sums["snr_sum"]) / n_img,
    }


def mse(pred: Tensor, target: Tensor) -> float:
    """Mean squared error over all elements of one batch (shapes ``[B, ...]``)."""
    return finalize(batch_sums(pred, target), "x")["x/mse"]


def psnr(pred: Tensor, target: Tensor) -> float:
    """Mean per-image PSNR in dB (data range 1.0) of one batch ``[B, ...]``."""
    return finalize(batch_sums(pred, target), "x")["x/psnr_db"]


def snr(pred: Tensor, target: Tensor) -> float:
    """Mean per-image SNR in dB, 10·log10(signal power / noise power), of one batch ``[B, ...]``."""
    return finalize(batch_sums(pred, target), "x")["x/snr_db"]


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def knn_accuracy(
    train_z: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_z: Tensor | np.ndarray,
    test_y: Tensor | np.ndarray,
    k: int = 5,
) -> float:
    """Class accuracy of a k-nearest-neighbour classifier on latents.

    Args:
        train_z: ``[N, D]`` latents that fit the classifier; train_y: ``[N]`` integer labels.
        test_z: ``[M, D]`` latents to classify; test_y: ``[M]`` labels.
        k: neighbours (capped at N).

    Features are standardized with the train statistics first, so that one latent axis with a
    large scale does not decide every distance.
    """
    xtr = _as_numpy(train_z).reshape(len(train_z), -1)
    xte = _as_numpy(test_z).reshape(len(test_z), -1)
    ytr, yte = _as_numpy(train_y).ravel(), _as_numpy(test_y).ravel()
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError("knn_accuracy needs at least one train and one test sample")
    scaler = StandardScaler().fit(xtr)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(xtr))).fit(scaler.transform(xtr), ytr)
    return float((clf.predict(scaler.transform(xte)) == yte).mean())


def latent_gaussianity(z: Tensor) -> dict[str, float]:
    """How close latent samples ``z`` ``[N, D]`` are to N(0, I); every value is 0 for a perfect match.

    Returns:
        ``mean_norm``: ‖mean(z)‖₂; ``std_dev``: mean over dims of |std_d − 1|;
        ``kl``: KL(N(μ, diag σ²) ‖ N(0, I)) of the fitted diagonal Gaussian, in nats,
        ½ Σ_d (σ_d² + μ_d² − 1 − log σ_d²).
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"expected latents [N>=2, D], got shape {tuple(z.shape)}")
    x = z.detach().to(torch.float64)
    mu = x.mean(dim=0)
    var = x.var(dim=0, unbiased=True).clamp_min(1e-12)  # floor: a collapsed dim gives a large, finite KL
    kl = 0.5 * (var + mu.square() - 1.0 - var.log()).sum()
    return {
        "mean_norm": float(mu.norm()),
        "std_dev": float((var.sqrt() - 1.0).abs().mean()),
        "kl": float(kl),
    }
