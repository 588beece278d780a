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

from collections.abc import Callable, Sequence

import numpy as np
import torch
from einops import rearrange
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from aedist.registry import Registry

# Floors that keep a perfect reconstruction (or a black target) from producing ±inf, which would
# poison a mean over images; 1e-10 MSE caps PSNR at 100 dB for data range 1.
MSE_FLOOR = 1e-10
POWER_FLOOR = 1e-20

# Reconstruction metrics: (pred, target) as float64 [B, P] in [0, 1] -> one value per image [B].
# Reported values are means over images, so sums add up exactly over batches and ranks.
METRICS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("metric")


@METRICS.register("mse")
def _mse(p: Tensor, t: Tensor) -> Tensor:
    # Every image has the same pixel count, so the mean of per-image MSEs is the all-pixel MSE.
    return (t - p).square().mean(dim=1)


@METRICS.register("psnr_db")
def _psnr(p: Tensor, t: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / (t - p).square().mean(dim=1).clamp_min(MSE_FLOOR))


@METRICS.register("snr_db")
def _snr(p: Tensor, t: Tensor) -> Tensor:
    sig, err = t.square().sum(dim=1), (t - p).square().sum(dim=1)
    return 10.0 * (torch.log10(sig.clamp_min(POWER_FLOOR)) - torch.log10(err.clamp_min(POWER_FLOOR)))


def _selected(names: Sequence[str] | None) -> list[str]:
    """``names`` (each must be registered), or every registered metric when None."""
    if names is None:
        return list(METRICS)
    for name in names:
        METRICS.get(name, key="eval.metrics")  # UserError naming the known ones
    return list(names)


def sum_keys(names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The keys of :func:`batch_sums` (computed on call: metrics may register after import)."""
    return ("n_images", *_selected(names))


def batch_sums(pred: Tensor, target: Tensor, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-batch sums that add up exactly over batches and ranks: ``n_images`` and, for every
    registered metric (or those in ``names``), the sum of its per-image values (0-d float64
    tensors on ``pred``'s device).

    Args:
        pred: reconstructions ``[B, ...]`` (e.g. ``[B, C, H, W]``), values in the data range [0, 1].
        target: clean images, same shape as ``pred``.
        names: the METRICS entries to compute (``eval.metrics`` picks them); None: all of them.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [B, ...], got shape {tuple(pred.shape)}")
    # float64 so that sums over a whole test set (≈10^7 pixels) lose nothing, even from bf16 inputs.
    p = pred.detach().to(torch.float64).flatten(1)
    t = target.detach().to(device=pred.device, dtype=torch.float64).flatten(1)
    sums = {"n_images": torch.tensor(float(p.shape[0]), dtype=torch.float64, device=pred.device)}
    sums.update({name: METRICS.get(name)(p, t).sum() for name in _selected(names)})
    return sums


def accumulate(total: dict[str, Tensor] | None, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``sums`` (from :func:`batch_sums`) into ``total``; ``total=None`` starts a new tally."""
    if total is None:
        return {k: v.clone() for k, v in sums.items()}
    return {k: total[k] + sums[k] for k in sums}


def finalize(sums: dict[str, Tensor], prefix: str, names: Sequence[str] | None = None) -> dict[str, float]:
    """Turn (all-reduced) sums into ``{prefix}/NAME`` means over images for every registered
    metric (mse, psnr_db, snr_db, ...) or those in ``names``; NaN when no image was counted."""
    n_img = float(sums["n_images"])
    return {f"{prefix}/{name}": float(sums[name]) / n_img if n_img > 0 else float("nan") for name in _selected(names)}


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
    return float((knn_predict(train_z, train_y, test_z, k) == _as_numpy(test_y).ravel()).mean())


def knn_predict(train_z: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_z: Tensor | np.ndarray, k: int = 5) -> np.ndarray:
    """The class :func:`knn_accuracy`'s classifier predicts for each test latent ``[M]`` (one fit, so
    accuracies over subsets of the test latents, e.g. per class, need no refit)."""
    xtr = _as_numpy(train_z).reshape(len(train_z), -1)
    xte = _as_numpy(test_z).reshape(len(test_z), -1)
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError("knn_accuracy needs at least one train and one test sample")
    scaler = StandardScaler().fit(xtr)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(xtr))).fit(scaler.transform(xtr), _as_numpy(train_y).ravel())
    return clf.predict(scaler.transform(xte))


def class_regions(
    train_z: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_z: Tensor | np.ndarray, test_y: Tensor | np.ndarray,
) -> dict[str, float]:
    """Where test latents sit relative to the class regions of the train latents (standardized with the
    train statistics, like :func:`knn_accuracy`), for "rotated embeddings stay in their class's region"
    and "more dispersed clusters".

    Returns:
        ``in_class``: share of test latents whose nearest class centroid (mean train latent of a class)
        is their own class's; ``spread``: mean distance of test latents to their own centroid over the
        mean distance between centroids (larger = clusters more dispersed relative to their separation).
    """
    xtr = _as_numpy(train_z).reshape(len(train_z), -1).astype(np.float64)
    xte = _as_numpy(test_z).reshape(len(test_z), -1).astype(np.float64)
    ytr, yte = _as_numpy(train_y).ravel(), _as_numpy(test_y).ravel()
    classes = np.unique(ytr)
    if len(classes) < 2 or len(xte) == 0:
        raise ValueError("class_regions needs train latents of at least 2 classes and one test latent")
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    centroids = np.stack([xtr[ytr == c].mean(axis=0) for c in classes])
    dist = np.linalg.norm(xte[:, None, :] - centroids[None], axis=-1)  # [M, classes]
    own = np.searchsorted(classes, yte)
    known = (own < len(classes)) & (classes[np.minimum(own, len(classes) - 1)] == yte)  # test classes the train set has
    between = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)[np.triu_indices(len(classes), 1)].mean()
    rows = np.flatnonzero(known)
    return {"in_class": float((dist[rows].argmin(axis=1) == own[rows]).mean()) if len(rows) else float("nan"),
            "spread": float(dist[rows, own[rows]].mean() / between) if len(rows) and between > 0 else float("nan")}


def latent_gaussianity(z: Tensor) -> dict[str, float]:
    """How close latent samples are to N(0, I); every value is 0 for a perfect match.

    Args:
        z: flat latents ``[N, D]``: N samples of a D-vector. Spatial latents ``[N, C, h, w]`` (any
            ``[N, C, *positions]``) are pooled per channel: every (image, position) pair is one sample
            of a C-vector, ``rearrange(z, 'n c ... -> (n ...) c')``, so the statistics are per channel
            (a KL model's prior is the same N(0, 1) at every position) and the values are those of a
            C-dim latent. Needs at least 2 samples.

    Returns:
        ``mean_norm``: ‖mean(z)‖₂; ``std_dev``: mean over dims of |std_d − 1|;
        ``kl``: KL(N(μ, diag σ²) ‖ N(0, I)) of the fitted diagonal Gaussian, in nats,
        ½ Σ_d (σ_d² + μ_d² − 1 − log σ_d²).
    """
    if z.dim() > 2:
        z = rearrange(z, "n c ... -> (n ...) c")
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"expected latents [N, D] or [N, C, h, w] with at least 2 samples, got shape {tuple(z.shape)}")
    x = z.detach().to(torch.float64)
    mu = x.mean(dim=0)
    var = x.var(dim=0, unbiased=True).clamp_min(1e-12)  # floor: a collapsed dim gives a large, finite KL
    kl = 0.5 * (var + mu.square() - 1.0 - var.log()).sum()
    return {
        "mean_norm": float(mu.norm()),
        "std_dev": float((var.sqrt() - 1.0).abs().mean()),
        "kl": float(kl),
    }
