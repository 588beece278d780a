"""Metrics against independent references: numpy formulas, split-batch sums, kNN, N(0, I) distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aedist import metrics


def _np_reference(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = ((target - pred) ** 2).reshape(len(pred), -1)
    sig = (target**2).reshape(len(pred), -1)
    return {
        "mse": float(err.mean()),
        "psnr": float(np.mean(10 * np.log10(1.0 / err.mean(axis=1)))),
        "snr": float(np.mean(10 * np.log10(sig.sum(axis=1) / err.sum(axis=1)))),
    }


def test_mse_psnr_snr_match_numpy() -> None:
    rng = np.random.default_rng(0)
    target = rng.random((6, 3, 8, 8))
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    ref = _np_reference(pred, target)
    got = metrics.finalize(metrics.batch_sums(torch.from_numpy(pred), torch.from_numpy(target)), "t")
    assert got["t/mse"] == pytest.approx(ref["mse"], rel=1e-9)
    assert got["t/psnr_db"] == pytest.approx(ref["psnr"], rel=1e-9)
    assert got["t/snr_db"] == pytest.approx(ref["snr"], rel=1e-9)


def test_sums_over_split_batches_equal_the_whole_batch() -> None:
    torch.manual_seed(0)
    target, pred = torch.rand(10, 1, 5, 5), torch.rand(10, 1, 5, 5)
    whole = metrics.finalize(metrics.batch_sums(pred, target), "x")
    total = None
    for a, b in ((0, 3), (3, 4), (4, 10)):  # uneven pieces, as ranks and last batches give
        total = metrics.accumulate(total, metrics.batch_sums(pred[a:b], target[a:b]))
    assert metrics.finalize(total, "x") == pytest.approx(whole, rel=1e-12)


def test_snr_of_known_noise_level() -> None:
    # Constant signal 0.5 (power 0.25 per pixel) plus noise of std 0.05 (power 0.0025): SNR = 20 dB.
    g = torch.Generator().manual_seed(0)
    target = torch.full((4, 1, 64, 64), 0.5, dtype=torch.float64)
    pred = target + 0.05 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    assert metrics.snr(pred, target) == pytest.approx(20.0, abs=0.1)
    assert metrics.psnr(pred, target) == pytest.approx(10 * np.log10(1 / 0.0025), abs=0.1)


def test_empty_and_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        metrics.batch_sums(torch.rand(2, 3), torch.rand(2, 4))
    nan = metrics.finalize({k: torch.tensor(0.0) for k in metrics.sum_keys()}, "e")
    assert all(np.isnan(v) for v in nan.values())


def test_knn_separable_clusters_and_random_labels() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 6))
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    z_tr = centres[y_tr] + rng.normal(0, 0.5, (400, 6))
    z_te = centres[y_te] + rng.normal(0, 0.5, (200, 6))
    assert metrics.knn_accuracy(z_tr, y_tr, z_te, y_te, k=5) > 0.98
    noise_tr, noise_te = rng.normal(size=(400, 6)), rng.normal(size=(200, 6))
    assert abs(metrics.knn_accuracy(noise_tr, y_tr, noise_te, y_te, k=5) - 0.25) < 0.12


def test_gaussianity_ranks_standard_normal_closest() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 8, generator=g)
    ref = metrics.latent_gaussianity(z)
    shifted = metrics.latent_gaussianity(z + 2.0)
    scaled = metrics.latent_gaussianity(z * 0.1)
    assert ref["kl"] < 0.01 and ref["mean_norm"] < 0.2
    assert shifted["kl"] > ref["kl"] + 1 and scaled["kl"] > ref["kl"] + 1
    # The KL of the fitted diagonal Gaussian matches the closed form: 8 dims, mean 2 -> 0.5 * 8 * 4 = 16.
    assert shifted["kl"] == pytest.approx(16.0, rel=0.05)


def test_sums_are_float64_scalars_even_from_bf16() -> None:
    """All-reducible: 0-d float64 on pred's device, whatever the autocast dtype of pred."""
    target = torch.rand(6, 1, 8, 8)
    sums = metrics.batch_sums(target.to(torch.bfloat16), target)
    assert set(sums) == set(metrics.sum_keys())
    assert all(v.dtype == torch.float64 and v.dim() == 0 and v.device == target.device for v in sums.values())
    assert sums["n_images"].item() == 6
    bf = target.to(torch.bfloat16).double().numpy()
    per_image_mse = ((target.double().numpy() - bf) ** 2).reshape(6, -1).mean(axis=1)
    assert sums["mse"].item() == pytest.approx(float(per_image_mse.sum()), rel=1e-12)


def test_perfect_reconstruction_stays_finite() -> None:
    target = torch.rand(3, 1, 4, 4)
    got = metrics.finalize(metrics.batch_sums(target.clone(), target), "p")
    assert got["p/mse"] == 0.0
    assert got["p/psnr_db"] == pytest.approx(100.0)  # per-image MSE floored at 1e-10
    assert np.isfinite(got["p/snr_db"])


def test_knn_standardizes_features() -> None:
    # The class lives on an axis measured in tiny units; a noise axis in large units would decide every
    # raw Euclidean distance, so this is only separable after standardization.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    z = np.stack([(y + rng.normal(0, 0.05, 600)) * 1e-4, rng.normal(0, 0.3, 600)], axis=1)
    assert metrics.knn_accuracy(z[:400], y[:400], z[400:], y[400:], k=5) > 0.95


def test_gaussianity_closed_form_for_scaled_latents() -> None:
    z = torch.randn(4000, 6, generator=torch.Generator().manual_seed(1)) * 3.0
    got = metrics.latent_gaussianity(z)
    assert got["std_dev"] == pytest.approx(2.0, rel=0.05)
    assert got["kl"] == pytest.approx(0.5 * 6 * (9 - 1 - np.log(9)), rel=0.05)  # KL(N(0, 9I) || N(0, I))


def test_class_regions_match_sklearn_nearest_centroid_and_a_hand_computed_spread() -> None:
    from sklearn.neighbors import NearestCentroid
    from sklearn.preprocessing import StandardScaler

    from aedist.metrics import class_regions

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 4.0, -1.0]])
    ytr, yte = rng.integers(0, 3, 300), rng.integers(0, 3, 120)
    xtr = centers[ytr] + rng.normal(0, 1.0, (300, 3)) * [1, 5, 0.2]  # unequal axis scales: standardization matters
    xte = centers[yte] + rng.normal(0, 1.5, (120, 3)) * [1, 5, 0.2]
    out = class_regions(torch.tensor(xtr), torch.tensor(ytr), xte, yte)
    sc = StandardScaler().fit(xtr)
    ref = NearestCentroid().fit(sc.transform(xtr), ytr)
    assert out["in_class"] == pytest.approx(float((ref.predict(sc.transform(xte)) == yte).mean()))
    c = ref.centroids_
    own = np.linalg.norm(sc.transform(xte) - c[yte], axis=1).mean()
    between = np.mean([np.linalg.norm(c[i] - c[j]) for i in range(3) for j in range(i + 1, 3)])
    assert out["spread"] == pytest.approx(own / between)
    wider = class_regions(xtr, ytr, centers[yte] + rng.normal(0, 3.0, (120, 3)) * [1, 5, 0.2], yte)
    assert wider["spread"] > out["spread"]  # more dispersed test latents read as a larger spread
