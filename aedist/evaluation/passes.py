"""Evaluation passes: loss terms and metrics over a split, reduced across ranks, and the latent kNN.

Used by the engine every ``train.eval_every`` epochs and by ``launch/evaluate.py`` on a finished run.
Metrics are computed in pixel space [0, 1] even when the model sees normalized inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from aedist import metrics
from aedist.batch import prepare_batch, to_pixels
from aedist.config import Config
from aedist.data import load_batches
from aedist.data.corruption import make_generator
from aedist.evaluation.quality import QualityTally
from aedist.losses import compute_loss
from aedist.models import is_variational
from aedist.models.ae import AEOutput

EVAL_STEP = 1 << 40  # generator "steps" for evaluation draws, far from any training step
# ({"clean": [N, *latent_shape], corruption name: [N, *latent_shape]}, labels [N]): latents keep their shape
# ([N, D] flat, [N, C, h, w] spatial); each consumer says how it gets a vector (kNN and scatter flatten them).
Latents = tuple[dict[str, np.ndarray], np.ndarray]


def split_limit(cfg: Config, limit: int = 0) -> int:
    """How many samples of a split a pass reads: the smaller of ``limit`` and ``data.limit`` where set (0 = all)."""
    limits = [v for v in (cfg.data.limit, limit) if v > 0]
    return min(limits) if limits else 0


def eval_batches(cfg: Config, accelerator: Accelerator, split: str, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's disjoint part of a split, in order, every sample once across ranks."""
    yield from load_batches(
        cfg.data.shards, split, cfg.data.eval_batch_size, accelerator.process_index, accelerator.num_processes,
        seed=cfg.train.seed, device=accelerator.device, shuffle=False, drop_last=False,
        limit=split_limit(cfg, limit), on_error=cfg.data.on_error, pin_memory=cfg.data.pin_memory,
    )


class _Tally:
    """Sums of loss terms and of the ``eval.metrics`` of every set on this rank, reduced across
    ranks in one all-reduce (after agreeing on the metric sums' shapes)."""

    def __init__(self, quality: QualityTally) -> None:
        self.loss: dict[str, float] = {}
        self.n = 0.0
        self.quality = quality

    def add_loss(self, terms: dict[str, torch.Tensor], n: int) -> None:
        for k, v in terms.items():
            self.loss[k] = self.loss.get(k, 0.0) + float(v) * n
        self.n += n

    def add(self, name: str, pred: torch.Tensor, target: torch.Tensor, out: AEOutput | None = None) -> None:
        self.quality.add(name, pred, target, out)

    def reduce(self, accelerator: Accelerator, split: str, loss_keys: list[str], set_names: list[str]) -> dict[str, float]:
        # Loss keys come from the caller and the metric sums' layout from every rank (gathered), not
        # from this rank's batches: a rank that held no batch still joins the all-reduce with zeros,
        # so ranks never disagree on the collective's shape.
        layout = self.quality.layout(lambda part: gather_object([part]))
        head = torch.tensor([self.loss.get(k, 0.0) for k in loss_keys] + [self.n], dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(torch.cat([head, self.quality.flat(layout, accelerator.device)]), "sum")
        losses = total[:len(head)].tolist()
        out = {f"{split}/{k}": losses[j] / max(losses[-1], 1.0) for j, k in enumerate(loss_keys)}
        for name, values in self.quality.finalize(set_names, layout, total[len(head):]).items():
            sep = "_" if name.endswith("/input") else "/"  # "test_rotated/input/mse" reads better as "test_rotated/input_mse"
            out.update({f"{name}{sep}{k}": v for k, v in values.items()})
        return out


@torch.no_grad()
def evaluate_split(model: nn.Module, cfg: Config, accelerator: Accelerator, split: str,
                   prefix: str | None = None, limit: int = 0) -> tuple[dict[str, float], Latents]:
    """Loss terms (training corruption applied), clean-input metrics and one metric set per
    ``eval.corruptions`` entry (plus the corrupted inputs' own error, ``…/input_mse`` etc.).
    Returns the flat metrics and, gathered from all ranks, the latents of clean inputs (key
    ``"clean"``) and of each corruption's *decoded* outputs re-encoded (key = its name), plus the
    labels: a kNN on these tells whether decoding a corrupted image kept its class. ``prefix``
    replaces the split in the keys (``val_ema/mse`` for the EMA weights on ``val``). ``limit`` scores
    the split's first N samples only (besides ``data.limit``); other splits, such as the kNN's train
    sample, are not cut by it.
    """
    was_training = model.training
    model.eval()
    norm = cfg.data.normalize
    tally = _Tally(QualityTally(cfg.eval.metrics, lpips_net=cfg.eval.lpips_net))
    # per corruption: the decoded outputs re-encoded (NAME) and the corrupted inputs themselves (NAME/input)
    latents: dict[str, list[np.ndarray]] = {"clean": [], **{k: [] for name in cfg.eval.corruptions for k in (name, f"{name}/input")}}
    labels: list[np.ndarray] = []
    loss_keys: list[str] = ["loss", "recon", "kl"] if is_variational(model) else ["loss", "recon"]
    name_as = prefix or split
    for i, (images, y) in enumerate(eval_batches(cfg, accelerator, split, limit)):
        gen = make_generator(cfg.train.seed, accelerator.process_index, EVAL_STEP + i, images.device)
        batch = prepare_batch(images, cfg.corruption, gen, normalize=norm)
        out = model(batch.inputs)
        tally.add_loss(compute_loss(out, batch.targets, cfg.loss), len(images))
        # Without a training corruption the loss pass already is the clean pass (for VAEs in eval
        # mode z = mu): reuse it rather than run the model twice.
        clean = out if not cfg.corruption else model(prepare_batch(images, [], None, normalize=norm).inputs)
        tally.add(name_as, to_pixels(clean.recon.float(), norm), batch.clean, clean)  # clean.mu/logvar: latent metrics
        latents["clean"].append(_latent(clean))
        labels.append(y.cpu().numpy())
        for name, spec in cfg.eval.corruptions.items():
            c = prepare_batch(images, spec, gen, normalize=norm)
            c_out = model(c.inputs)
            tally.add(f"{name_as}_{name}", to_pixels(c_out.recon.float(), norm), c.pixel_targets)
            tally.add(f"{name_as}_{name}/input", c.pixel_inputs, c.pixel_targets)
            latents[name].append(model.encode(c_out.recon).float().cpu().numpy())
            latents[f"{name}/input"].append(_latent(c_out))  # the forward pass already encoded the corrupted input
    model.train(was_training)
    set_names = [name_as, *(f"{name_as}_{n}{s}" for n in cfg.eval.corruptions for s in ("", "/input"))]
    values = tally.reduce(accelerator, name_as, loss_keys, set_names)
    return values, ({k: _gather(v) for k, v in latents.items()}, _gather(labels))


def _latent(out: AEOutput) -> np.ndarray:
    """The latent a forward pass encoded: the posterior mean for KL models (what ``encode`` returns), so
    these match knn_metric's train latents even for a model whose eval-mode z is a sample."""
    return (out.z if out.mu is None else out.mu).float().cpu().numpy()


def _gather(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate this rank's arrays (possibly none), then every rank's, in rank order."""
    mine = [np.concatenate(parts)] if parts else []
    pieces = [p for p in gather_object(mine) if len(p)]
    return np.concatenate(pieces) if pieces else np.zeros((0,))


@torch.no_grad()
def knn_metric(model: nn.Module, cfg: Config, accelerator: Accelerator, test: Latents, split: str = "test",
               class_names: list[str] | None = None) -> dict[str, float]:
    """kNN class accuracy: fit on latents of the first ``eval.knn_train`` train images, score on test
    latents (``test/knn_acc``) and on re-encoded decodes of corrupted test images
    (``test_NAME/decoded_class_acc``: does the decoded image keep its class?). ``split`` names the
    keys: ``val`` when val latents stand in for test (shards without a test split). Also the class
    regions (:func:`aedist.metrics.class_regions`) of clean latents (``test/latent_in_class``,
    ``test/latent_spread``) and of corrupted inputs (``test_NAME/latent_in_class``), and the decoded
    class accuracy per class (``test_NAME/decoded_class_acc/CLASS``, CLASS from ``class_names``)."""
    model.eval()
    zs, ys = [], []
    for images, y in eval_batches(cfg, accelerator, "train", cfg.eval.knn_train):
        zs.append(model.encode(prepare_batch(images, [], None, normalize=cfg.data.normalize).inputs).float().cpu().numpy())
        ys.append(y.cpu().numpy())
    model.train()
    train_z, train_y = _gather(zs), _gather(ys)
    latents, test_y = test
    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return {}
    out = {f"{split}/knn_acc": metrics.knn_accuracy(train_z, train_y, latents["clean"], test_y, k=cfg.eval.knn_k)}
    out.update({f"{split}/latent_{k}": v for k, v in metrics.class_regions(train_z, train_y, latents["clean"], test_y).items()})
    names = class_names or []
    for name, z in latents.items():
        if name.endswith("/input"):  # the corrupted inputs' own latents: do they stay in their class's region?
            regions = metrics.class_regions(train_z, train_y, z, test_y)
            out[f"{split}_{name.removesuffix('/input')}/latent_in_class"] = regions["in_class"]
        elif name != "clean":
            hit = metrics.knn_predict(train_z, train_y, z, k=cfg.eval.knn_k) == test_y  # one fit: overall and per class
            out[f"{split}_{name}/decoded_class_acc"] = float(hit.mean())
            for c in np.unique(test_y).tolist():  # per class: a seed may say which classes keep theirs
                label = names[c] if 0 <= c < len(names) else str(c)
                out[f"{split}_{name}/decoded_class_acc/{label}"] = float(hit[test_y == c].mean())
    return out
