"""The figure set: one registered function per figure, drawn on a fixed probe of test images.

A figure is ``fn(ctx) -> {key: HxWx3 uint8 array}`` (empty when it does not apply to the run):

    @FIGURES.register("my_figure")
    def my_figure(ctx: FigureContext) -> dict[str, np.ndarray]:
        return {"figures/my_figure": visuals.image_grid(ctx.recon(ctx.x[:8]), nrow=8)}

Latents may be flat ``[B, D]`` or spatial ``[B, C, h, w]`` (``model.latent_shape``): the scatter
flattens them, interpolation and prior samples work on any shape, the decoded latent plane needs
``latent_shape == (2,)``. ``recon_ema`` appears only when an EMA model is passed to :func:`draw_figures`.

The engine draws them every ``log.figures_every`` epochs (``ctx.full`` adds the slow t-SNE views
at the end), ``launch/evaluate.py`` once more on the final checkpoint; each lands in W&B and in
``runs/NAME/figures/`` as ``KEY_epochNNN.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import nn

from aedist import visuals
from aedist.batch import prepare_batch, to_pixels
from aedist.config import Config
from aedist.data import load_batches, read_manifest
from aedist.data.corruption import make_generator, rotate, spec_is_geometric
from aedist.evaluation.passes import EVAL_STEP, Latents
from aedist.registry import Registry

FIGURES: Registry[Callable[[FigureContext], dict[str, np.ndarray]]] = Registry("figure")


@dataclass
class FigureContext:
    """What every figure may use: the model in eval mode, the probe images (pixels) and labels, the
    test latents of the last evaluation, the class names, whether to draw the slow views and, when
    training keeps one, the EMA copy of the model (also in eval mode)."""

    model: nn.Module
    cfg: Config
    x: torch.Tensor  # [P, C, H, W] in [0, 1]
    y: torch.Tensor  # [P]
    latents: Latents | None  # None: this evaluation ran neither a val nor a test pass
    class_names: list[str]
    full: bool
    ema_model: nn.Module | None = None

    def recon(self, pixels: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The reconstruction of pixel images by ``model`` (default: the trained model), back in pixels."""
        norm = self.cfg.data.normalize
        net = self.model if model is None else model
        return to_pixels(net(prepare_batch(pixels, [], None, normalize=norm).inputs).recon.float(), norm).clamp(0, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, *latent_shape]`` -> pixel images ``[N, C, H, W]`` in [0, 1]."""
        return to_pixels(self.model.decode(z).float(), self.cfg.data.normalize).clamp(0, 1)

    def latent_shape(self) -> tuple[int, ...]:
        """One latent's shape without the batch dim: ``model.latent_shape``, or that of an encoded probe
        image for a model that does not declare it."""
        shape = getattr(self.model, "latent_shape", None)
        if shape is None:
            shape = self.model.encode(prepare_batch(self.x[:1], [], None, normalize=self.cfg.data.normalize).inputs).shape[1:]
        return tuple(int(d) for d in shape)

    def is_kl(self) -> bool:
        """Whether the model is a KL model: its output carries a posterior (mu, logvar), so z ~ N(0, I)
        is its prior. Read from one forward pass, which holds for any model honouring AEOutput."""
        out = self.model(prepare_batch(self.x[:1], [], None, normalize=self.cfg.data.normalize).inputs)
        return out.mu is not None and out.logvar is not None

    def first_of_each_class(self) -> list[int]:
        """Probe indices of the first image of every class present, in class order."""
        return [int((self.y == c).nonzero()[0]) for c in torch.unique(self.y).tolist()]


def eval_split(splits: Collection[str]) -> str | None:
    """The split that stands for "held out" in evaluation, kNN and figures: test, else val (a pack of a
    folder made with --test-fraction 0, or before test was carved), else None (nothing to evaluate on)."""
    return next((s for s in ("test", "val") if s in splits), None)


def load_probe(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fixed probe set: the first ``log.probe_size`` images of :func:`eval_split` (test, else val), the
    same every epoch; None for shards with neither."""
    split = eval_split(read_manifest(cfg.data.shards).splits)
    if split is None:
        return None
    xs, ys = [], []
    for images, y in load_batches(cfg.data.shards, split, cfg.log.probe_size, device=device, shuffle=False,
                                  drop_last=False, limit=cfg.log.probe_size, on_error=cfg.data.on_error):
        xs.append(images)
        ys.append(y)
    return torch.cat(xs).float() / 255.0, torch.cat(ys)


@torch.no_grad()
def draw_figures(model: nn.Module, cfg: Config, probe: tuple[torch.Tensor, torch.Tensor], latents: Latents | None,
                 class_names: list[str], full: bool, ema_model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Every registered figure that applies to this run, keyed ``figures/NAME``; ``ema_model`` (the EMA
    copy of ``model``, e.g. a torch AveragedModel) adds ``figures/recon_ema``."""
    modes = [(m, m.training) for m in (model, ema_model) if m is not None]
    for m, _ in modes:
        m.eval()
    # Shards written by other tools may name no classes (or fewer than their labels): label by number.
    labels = [probe[1].cpu().numpy()] + ([latents[1]] if latents is not None else [])
    top = max((int(np.max(y)) for y in labels if y.size), default=-1)
    names = list(class_names) + [str(i) for i in range(len(class_names), top + 1)]
    ctx = FigureContext(model, cfg, probe[0], probe[1], latents, names, full, ema_model)
    figs: dict[str, np.ndarray] = {}
    for _, fn in FIGURES.items():
        figs.update(fn(ctx))
    for m, was_training in modes:
        m.train(was_training)
    return figs


@FIGURES.register("recon")
def recon(ctx: FigureContext) -> dict[str, np.ndarray]:
    """Clean / corrupted / reconstructed rows for the training corruption and each eval corruption."""
    show = ctx.x[:16]
    out = {}
    for key, spec, step in [("recon", ctx.cfg.corruption, EVAL_STEP - 1),
                            *((f"recon_{n}", s, EVAL_STEP - 2) for n, s in ctx.cfg.eval.corruptions.items())]:
        inputs = prepare_batch(show, spec, make_generator(ctx.cfg.train.seed, 0, step, show.device)).pixel_inputs
        if len(inputs) > len(show):  # a batch-growing corruption puts the originals first: show the first copies
            inputs = inputs[len(show): 2 * len(show)]
        out[f"figures/{key}"] = visuals.recon_grid(show, inputs, ctx.recon(inputs))
    return out


@FIGURES.register("recon_error")
def recon_error(ctx: FigureContext) -> dict[str, np.ndarray]:
    """Clean probe images, their reconstructions and the error map |x - x_hat| (mean over channels) as a heat map."""
    show = ctx.x[:16]
    return {"figures/recon_error": visuals.error_grid(show, [("recon", ctx.recon(show))])}


@FIGURES.register("recon_ema")
def recon_ema(ctx: FigureContext) -> dict[str, np.ndarray]:
    """Runs with EMA only: input / raw recon / EMA recon and both error maps on one colour scale."""
    if ctx.ema_model is None:
        return {}
    show = ctx.x[:16]
    outputs = [("raw", ctx.recon(show)), ("EMA", ctx.recon(show, ctx.ema_model))]
    return {"figures/recon_ema": visuals.error_grid(show, outputs, title="Raw and EMA reconstructions, |x - x_hat|")}


@FIGURES.register("samples")
def samples(ctx: FigureContext) -> dict[str, np.ndarray]:
    """A look at the data itself: the first three probe images of every class, one row per class
    (seed 000's figure 1). The data does not change while training: only the full evaluations (the last
    epoch's, evaluate.py's) draw it."""
    return {"figures/samples": visuals.class_samples(ctx.x, ctx.y, ctx.class_names)} if ctx.full else {}


@FIGURES.register("latent")
def latent(ctx: FigureContext) -> dict[str, np.ndarray]:
    """The latent plane itself for flat 2-D latents; PCA otherwise, plus t-SNE in 2-D and 3-D on the full
    draw. Spatial latents [N, C, h, w] are projected as flattened C·h·w vectors (the titles say so)."""
    if ctx.latents is None:  # no val split and train.test_every skipped this epoch's test pass: nothing to plot
        return {}
    z, labels = ctx.latents[0]["clean"], ctx.latents[1]
    if not len(z):
        return {}
    if z.shape[1:] == (2,):
        return {"figures/latent": visuals.latent_scatter(z, labels, ctx.class_names)}
    out = {"figures/latent_pca": visuals.latent_scatter(z, labels, ctx.class_names, method="pca")}
    if ctx.full:
        sub = slice(0, 2000)  # t-SNE is quadratic-ish; 2000 points keep it to seconds on 2 cores
        out["figures/latent_tsne"] = visuals.latent_scatter(z[sub], labels[sub], ctx.class_names, method="tsne")
        out["figures/latent_tsne3d"] = visuals.latent_scatter(z[sub], labels[sub], ctx.class_names, method="tsne", dims=3)
    return out


@FIGURES.register("interpolation")
def interpolation(ctx: FigureContext) -> dict[str, np.ndarray]:
    """An 8-step latent path between the first probe images of the first two classes."""
    firsts = ctx.first_of_each_class()
    if len(firsts) < 2:
        return {}
    a, b = firsts[:2]
    norm = ctx.cfg.data.normalize
    za, zb = (ctx.model.encode(prepare_batch(ctx.x[i:i + 1], [], None, normalize=norm).inputs) for i in (a, b))
    path = visuals.interpolate_latents(za[0], zb[0], steps=8)
    names = [ctx.class_names[int(ctx.y[i])] for i in (a, b)]
    return {"figures/interpolation": visuals.interpolation_strip(ctx.decode(path.to(za.dtype)), title=f"{names[0]} -> {names[1]}")}


@FIGURES.register("rotation_panel")
def rotation_panel(ctx: FigureContext) -> dict[str, np.ndarray]:
    """One image per class at 10 angles with its reconstruction and latent path (rotation runs only)."""
    specs = [ctx.cfg.corruption, *ctx.cfg.eval.corruptions.values()]
    firsts = ctx.first_of_each_class()
    if not firsts or not any(spec_is_geometric(s) for s in specs):
        return {}
    images = ctx.x[firsts]  # [K, C, H, W]
    angles = torch.linspace(0, 360, 11, device=images.device)[:-1]
    k, a = len(firsts), len(angles)
    rotated = rotate(images.repeat_interleave(a, 0), angles.repeat(k))
    norm = ctx.cfg.data.normalize
    out = ctx.model(prepare_batch(rotated, [], None, normalize=norm).inputs)
    shape = (k, a, *images.shape[1:])
    return {"figures/rotation_panel": visuals.rotation_panel(
        rotated.view(shape), to_pixels(out.recon.float(), norm).clamp(0, 1).view(shape),
        rearrange(out.z.float(), "(k a) ... -> k a (...)", k=k, a=a),  # spatial latents: flattened, then PCA
        [ctx.class_names[int(ctx.y[i])] for i in firsts], angles.tolist())}


@FIGURES.register("prior_samples")
def prior_samples(ctx: FigureContext) -> dict[str, np.ndarray]:
    """KL models only (output with mu/logvar): decodes of z ~ N(0, I) drawn at [64, *latent_shape], and the
    decoded latent plane when the latent is flat 2-D."""
    if not ctx.is_kl():
        return {}
    shape = ctx.latent_shape()
    zs = torch.randn(64, *shape, generator=torch.Generator(device="cpu").manual_seed(ctx.cfg.train.seed)).to(ctx.x.device)
    title = f"Decodes of z ~ N(0, I), z of shape {'x'.join(map(str, shape))}"
    out = {"figures/prior_samples": visuals.prior_samples(ctx.decode(zs), title=title)}
    if shape == (2,):
        plane = visuals.latent_plane(grid=8, extent=3.0).to(ctx.x.device)
        out["figures/latent_grid"] = visuals.latent_grid(ctx.decode(plane), extent=3.0)
    return out
