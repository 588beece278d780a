"""Evaluation passes (loss terms and metrics over a split, reduced across ranks) and the figure set.

Used by the engine every ``train.eval_every`` epochs and by ``launch/evaluate.py`` on a finished run.
Metrics are computed in pixel space [0, 1] even when the model sees normalized inputs (seed 001).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from aedist import metrics, visuals
from aedist.config import Config
from aedist.data import corrupt, load_batches
from aedist.data.corruption import make_generator, rotate
from aedist.losses import compute_loss
from aedist.models import AEOutput

EVAL_STEP = 1 << 40  # generator "steps" for evaluation draws, far from any training step


def to_model(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Pixels in [0, 1] -> what the model reads and reconstructs."""
    return (x - 0.5) / 0.5 if cfg.data.normalize else x


def to_pixels(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Model space -> pixels in [0, 1] (the inverse of :func:`to_model`)."""
    return x * 0.5 + 0.5 if cfg.data.normalize else x


def eval_batches(cfg: Config, accelerator: Accelerator, split: str, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's disjoint part of a split, in order, every sample once across ranks."""
    limits = [v for v in (cfg.data.limit, limit) if v > 0]
    yield from load_batches(
        cfg.data.shards, split, cfg.data.eval_batch_size, accelerator.process_index, accelerator.num_processes,
        seed=cfg.train.seed, device=accelerator.device, shuffle=False, drop_last=False,
        limit=min(limits) if limits else 0, on_error=cfg.data.on_error, pin_memory=cfg.data.pin_memory,
    )


@torch.no_grad()
def evaluate_split(model: nn.Module, cfg: Config, accelerator: Accelerator, split: str) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Loss terms (training corruption applied), clean-input metrics and one metric set per
    ``eval.corruptions`` entry (plus the corrupted inputs' own error, ``…/input_mse`` etc.).
    Returns the flat metrics and, gathered from all ranks, the latents [N,D] of clean inputs
    (key ``"clean"``) and of each corruption's *decoded* outputs re-encoded (key = its name), plus
    the labels [N]: a kNN on these tells whether decoding a corrupted image kept its class.
    """
    was_training = model.training
    model.eval()
    loss_sums: dict[str, float] = {}
    tallies: dict[str, dict[str, torch.Tensor]] = {}
    latents: dict[str, list[np.ndarray]] = {"clean": []}
    labels: list[np.ndarray] = []

    def tally(name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        tallies[name] = metrics.accumulate(tallies.get(name), metrics.batch_sums(pred, target))

    for i, (images, y) in enumerate(eval_batches(cfg, accelerator, split)):
        x = images.float() / 255.0
        gen = make_generator(cfg.train.seed, accelerator.process_index, EVAL_STEP + i, x.device)
        inputs, targets, _ = corrupt(x, cfg.corruption, gen)
        out: AEOutput = model(to_model(inputs, cfg))
        for k, v in compute_loss(out, to_model(targets, cfg), cfg.loss).items():
            loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * x.shape[0]
        loss_sums["n"] = loss_sums.get("n", 0.0) + x.shape[0]
        # Without a training corruption (and for VAEs in eval mode, z = mu) the loss pass already
        # is the clean pass: reuse it rather than run the model twice.
        clean: AEOutput = out if not cfg.corruption else model(to_model(x, cfg))
        tally(split, to_pixels(clean.recon.float(), cfg), x)
        latents["clean"].append(clean.z.float().cpu().numpy())
        labels.append(y.cpu().numpy())
        for name, spec in cfg.eval.corruptions.items():
            c_in, c_tgt, _ = corrupt(x, spec, gen)
            c_out = model(to_model(c_in, cfg)).recon
            tally(f"{split}_{name}", to_pixels(c_out.float(), cfg), c_tgt)
            tally(f"{split}_{name}/input", c_in.float(), c_tgt)
            latents.setdefault(name, []).append(model.encode(c_out).float().cpu().numpy())
    model.train(was_training)

    # One all-reduce for every sum: ranks may hold different numbers of batches, never different keys.
    names = sorted(tallies) if tallies else []
    loss_keys = sorted(k for k in loss_sums if k != "n")
    flat = [loss_sums.get(k, 0.0) for k in [*loss_keys, "n"]]
    for name in names:
        flat += [float(tallies[name][k]) for k in metrics.SUM_KEYS]
    total = accelerator.reduce(torch.tensor(flat, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    n = total[len(loss_keys)]
    out_metrics = {f"{split}/{k}": total[j] / max(n, 1.0) for j, k in enumerate(loss_keys)}
    offset = len(loss_keys) + 1
    for j, name in enumerate(names):
        vals = total[offset + j * len(metrics.SUM_KEYS): offset + (j + 1) * len(metrics.SUM_KEYS)]
        fin = metrics.finalize({k: torch.tensor(v) for k, v in zip(metrics.SUM_KEYS, vals)}, name)
        if name.endswith("/input"):  # "test_rotated/input/mse" reads better as "test_rotated/input_mse"
            fin = {k.replace("/input/", "/input_"): v for k, v in fin.items()}
        out_metrics.update(fin)
    gathered = {k: _gather(v) for k, v in latents.items()}
    return out_metrics, (gathered, _gather(labels))


def _gather(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate this rank's arrays, then every rank's, in rank order."""
    return np.concatenate(gather_object([np.concatenate(parts)]))


@torch.no_grad()
def knn_metric(model: nn.Module, cfg: Config, accelerator: Accelerator,
               test: tuple[dict[str, np.ndarray], np.ndarray]) -> dict[str, float]:
    """kNN class accuracy: fit on latents of the first ``eval.knn_train`` train images, score on test
    latents (``test/knn_acc``) and on re-encoded decodes of corrupted test images
    (``test_NAME/decoded_class_acc``: does the decoded image keep its class?)."""
    model.eval()
    zs, ys = [], []
    for images, y in eval_batches(cfg, accelerator, "train", cfg.eval.knn_train):
        zs.append(model.encode(to_model(images.float() / 255.0, cfg)).float().cpu().numpy())
        ys.append(y.cpu().numpy())
    model.train()
    train_z = np.concatenate(gather_object([np.concatenate(zs)]))
    train_y = np.concatenate(gather_object([np.concatenate(ys)]))
    latents, test_y = test
    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return {}
    out = {"test/knn_acc": metrics.knn_accuracy(train_z, train_y, latents["clean"], test_y, k=cfg.eval.knn_k)}
    for name, z in latents.items():
        if name != "clean":
            out[f"test_{name}/decoded_class_acc"] = metrics.knn_accuracy(train_z, train_y, z, test_y, k=cfg.eval.knn_k)
    return out


def load_probe(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe set: the first ``log.probe_size`` test images, the same every epoch."""
    xs, ys = [], []
    for images, y in load_batches(cfg.data.shards, "test", cfg.log.probe_size, device=device, shuffle=False,
                                  drop_last=False, limit=cfg.log.probe_size, on_error=cfg.data.on_error):
        xs.append(images)
        ys.append(y)
    return torch.cat(xs).float() / 255.0, torch.cat(ys)


def _uses_rotation(cfg: Config) -> bool:
    specs = [cfg.corruption, *cfg.eval.corruptions.values()]
    return any(op in ("rotate", "copies", "rot90") for spec in specs for entry in spec for op in entry)


@torch.no_grad()
def draw_figures(model: nn.Module, cfg: Config, probe: tuple[torch.Tensor, torch.Tensor],
                 test_latents: tuple[dict[str, np.ndarray], np.ndarray], class_names: list[str], full: bool) -> dict[str, np.ndarray]:
    """The figure set on the probe; ``full`` adds the slower t-SNE views (last epoch, evaluate.py)."""
    model.eval()
    x, y = probe
    dev = x.device
    show = x[:16]

    def recon(inputs: torch.Tensor) -> torch.Tensor:
        return to_pixels(model(to_model(inputs, cfg)).recon.float(), cfg).clamp(0, 1)

    gen = make_generator(cfg.train.seed, 0, EVAL_STEP - 1, dev)
    c_in, _, _ = corrupt(show, cfg.corruption, gen)
    if len(c_in) > len(show):  # `copies` put the originals first; show their first rotated copies
        c_in = c_in[len(show): 2 * len(show)]
    figs = {"figures/recon": visuals.recon_grid(show, c_in, recon(c_in))}
    for name, spec in cfg.eval.corruptions.items():
        e_in, _, _ = corrupt(show, spec, make_generator(cfg.train.seed, 0, EVAL_STEP - 2, dev))
        figs[f"figures/recon_{name}"] = visuals.recon_grid(show, e_in[: len(show)], recon(e_in[: len(show)]))

    z, labels = test_latents[0]["clean"], test_latents[1]
    if len(z) and z.shape[1] == 2:
        figs["figures/latent"] = visuals.latent_scatter(z, labels, class_names)
    elif len(z):
        figs["figures/latent_pca"] = visuals.latent_scatter(z, labels, class_names, method="pca")
        if full:
            sub = slice(0, 2000)  # t-SNE is quadratic-ish; 2000 points keep it to seconds on 2 cores
            figs["figures/latent_tsne"] = visuals.latent_scatter(z[sub], labels[sub], class_names, method="tsne")
            figs["figures/latent_tsne3d"] = visuals.latent_scatter(z[sub], labels[sub], class_names, method="tsne", dims=3)

    classes = [int(c) for c in torch.unique(y).tolist()]
    if len(classes) >= 2:  # interpolate between the first probe images of two different classes
        a = int((y == classes[0]).nonzero()[0])
        b = int((y == classes[1]).nonzero()[0])
        za, zb = model.encode(to_model(x[a:a + 1], cfg)), model.encode(to_model(x[b:b + 1], cfg))
        path = visuals.interpolate_latents(za[0], zb[0], steps=8)
        figs["figures/interpolation"] = visuals.interpolation_strip(
            to_pixels(model.decode(path.to(za.dtype)).float(), cfg).clamp(0, 1),
            title=f"{class_names[classes[0]]} -> {class_names[classes[1]]}")

    if _uses_rotation(cfg) and classes:
        firsts = torch.stack([x[int((y == c).nonzero()[0])] for c in classes])  # [K,C,H,W]
        angles = torch.linspace(0, 360, 11, device=dev)[:-1]  # 10 angles
        rotated = rotate(firsts.repeat_interleave(len(angles), 0), angles.repeat(len(classes)))
        out = model(to_model(rotated, cfg))
        k, a = len(classes), len(angles)
        figs["figures/rotation_panel"] = visuals.rotation_panel(
            rotated.view(k, a, *x.shape[1:]), to_pixels(out.recon.float(), cfg).clamp(0, 1).view(k, a, *x.shape[1:]),
            out.z.float().view(k, a, -1), [class_names[c] for c in classes], angles.tolist())

    if out_is_vae(model):
        d = model.latent_dim
        zs = torch.randn(64, d, generator=torch.Generator(device="cpu").manual_seed(cfg.train.seed)).to(dev)
        figs["figures/prior_samples"] = visuals.prior_samples(to_pixels(model.decode(zs).float(), cfg).clamp(0, 1))
        if d == 2:
            plane = visuals.latent_plane(grid=8, extent=3.0).to(dev)
            figs["figures/latent_grid"] = visuals.latent_grid(to_pixels(model.decode(plane).float(), cfg).clamp(0, 1), extent=3.0)
    model.train()
    return figs


def out_is_vae(model: nn.Module) -> bool:
    """VAEs expose a Gaussian encoder (mu and logvar heads)."""
    return hasattr(model.encoder, "logvar")
