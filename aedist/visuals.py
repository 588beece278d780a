"""Figures as pure functions: tensors/arrays in, uint8 RGB image arrays ``[H, W, 3]`` out.

    img = recon_grid(clean, noisy, recon)          # rows: clean / corrupted / output
    save_png(img, "runs/NAME/figures/recon.png")   # tracking.py sends the same array to W&B

Images are expected in [0, 1] (denormalize first) and are clamped for display. Figures are drawn
on matplotlib's Agg canvas directly (never pyplot), so no display is needed, no global figure
registry fills up, and nothing here imports W&B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, reduce, repeat
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits
from torch import Tensor
from torchvision.utils import make_grid

DPI = 100
PAD = 2  # pixels between cells in image grids; white, so that dark images stay apart


def to_uint8(grid: Tensor) -> np.ndarray:
    """Float image ``[3, H, W]`` in [0, 1] -> uint8 ``[H, W, 3]`` (same rounding as torchvision's save_image)."""
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def image_grid(images: Tensor | np.ndarray, nrow: int, padding: int = PAD, pad_value: float = 1.0) -> np.ndarray:
    """``[N, C, H, W]`` (C = 1 or 3, values in [0, 1]) -> uint8 ``[H', W', 3]`` tiled ``nrow`` per row."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float32).clamp(0, 1)
    return to_uint8(make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value))


def fig_to_array(fig: Figure) -> np.ndarray:
    """Render a figure on an Agg canvas -> uint8 ``[H, W, 3]``."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()  # drop artists now rather than waiting for the garbage collector
    return out


def _figure(width_px: float, height_px: float) -> Figure:
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _cell_centres(n: int, size: int, padding: int = PAD) -> list[float]:
    """Pixel centres of ``n`` cells of ``size`` px in a make_grid row/column."""
    return [padding + i * (size + padding) + (size - 1) / 2 for i in range(n)]


def _bare(ax: Axes) -> None:
    """No tick marks or frame around an image; tick labels stay as row/column labels."""
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show_grid(grid: np.ndarray, title: str | None = None, row_labels: Sequence[str] = (), row_pos: Sequence[float] = (),
               col_labels: Sequence[str] = (), col_pos: Sequence[float] = (), min_width: int = 560) -> np.ndarray:
    """Draw an image grid at an integer zoom (nearest, so pixels stay sharp) with row/column labels."""
    gh, gw = grid.shape[:2]
    zoom = max(1, min(6, math.ceil(min_width / gw)))
    left = 12 + 7 * max((len(s) for s in row_labels), default=0)
    top, bottom = (34 if title else 8), (24 if col_labels else 8)
    w, h = gw * zoom + left + 8, gh * zoom + top + bottom
    fig = _figure(w, h)
    ax = fig.add_axes((left / w, bottom / h, gw * zoom / w, gh * zoom / h))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks(list(row_pos), list(row_labels), fontsize=10)
    ax.set_xticks(list(col_pos), list(col_labels), fontsize=9)
    _bare(ax)
    if title:
        fig.suptitle(title, y=1 - 6 / h, va="top", fontsize=12)
    return fig_to_array(fig)


def recon_grid(
    clean: Tensor,
    corrupted: Tensor | None,
    output: Tensor,
    nrow: int | None = None,
    annotate: bool = True,
    captions: Sequence[str] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """Rows clean / corrupted / output of the first ``nrow`` samples (all when None).

    Args:
        clean, corrupted, output: ``[B, C, H, W]``, C = 1 or 3, values in [0, 1] (clamped).
            ``corrupted=None`` (a plain autoencoder) leaves that row out.
        annotate: False returns the bare ``make_grid(..., nrow=n, padding=2, pad_value=1)`` pixels;
            True adds row labels, optional per-column ``captions`` (e.g. "k=1") and a title.
    """
    rows = [("clean", clean), ("corrupted", corrupted), ("output", output)]
    rows = [(name, x) for name, x in rows if x is not None]
    n = min(len(clean), nrow or len(clean))
    grid = image_grid(torch.cat([torch.as_tensor(x[:n]).detach().cpu().float() for _, x in rows]), nrow=n)
    if not annotate:
        return grid
    h, w = clean.shape[-2:]
    cols = list(captions[:n]) if captions is not None else []
    return _show_grid(grid, title, [r for r, _ in rows], _cell_centres(len(rows), h), cols, _cell_centres(len(cols), w))


def error_maps(target: Tensor, output: Tensor) -> Tensor:
    """Per-pixel error |x − x̂| averaged over channels: ``[B, C, H, W]`` twice -> ``[B, H, W]`` (float32, CPU)."""
    t, o = (torch.as_tensor(v).detach().to("cpu", torch.float32) for v in (target, output))
    return reduce((t - o).abs(), "b c h w -> b h w", "mean")


def heat_rgb(maps: Tensor, vmax: float, cmap: str = "inferno") -> Tensor:
    """``[B, H, W]`` values on the scale 0..``vmax`` -> RGB ``[B, 3, H, W]`` in [0, 1] through ``cmap`` (clipped)."""
    rgba = colormaps[cmap](np.clip(maps.numpy() / max(vmax, 1e-12), 0.0, 1.0))
    return rearrange(torch.from_numpy(rgba[..., :3]).float(), "b h w c -> b c h w")


def error_grid(
    clean: Tensor,
    outputs: Sequence[tuple[str, Tensor]],
    nrow: int | None = None,
    annotate: bool = True,
    title: str | None = None,
) -> np.ndarray:
    """Rows: ``clean`` (the input), each named output, then each output's error map |clean − output|
    (mean over channels, :func:`error_maps`) as an inferno heat map, all on one scale 0..max error shown,
    so that maps of two models (raw and EMA) compare by colour.

    Args:
        clean: ``[B, C, H, W]`` in [0, 1]; outputs: ``(label, [B, C, H, W])`` pairs, e.g. ``[("recon", x_hat)]``.
        annotate: False returns the bare ``make_grid`` pixels (grey images repeated to RGB).
    """
    n = min(len(clean), nrow or len(clean))
    imgs = [torch.as_tensor(x[:n]).detach().to("cpu", torch.float32).clamp(0, 1) for x in (clean, *(o for _, o in outputs))]
    errs = [error_maps(imgs[0], o) for o in imgs[1:]]
    vmax = max(float(e.max()) for e in errs)
    rgb = [repeat(x, "b 1 h w -> b c h w", c=3) if x.shape[1] == 1 else x for x in imgs]  # one channel count per grid
    grid = image_grid(torch.cat([*rgb, *(heat_rgb(e, vmax) for e in errs)]), nrow=n)
    if not annotate:
        return grid
    labels = ["input", *(name for name, _ in outputs), *(f"|err| {name}" for name, _ in outputs)]
    head = title or "Reconstructions and |x - x_hat|"
    return _show_grid(grid, f"{head} (mean over channels; black 0 to yellow {vmax:.3g})", labels, _cell_centres(len(labels), clean.shape[-2]))


def _project(z: np.ndarray, method: str, dims: int, seed: int) -> tuple[np.ndarray, list[str], str]:
    """``[N, D]`` -> ``[N, dims]``, axis names and method: direct when D == dims, else PCA or t-SNE."""
    d = z.shape[1]
    if d < dims:
        raise ValueError(f"cannot show {d}-D latents in {dims}-D; use dims={d}")
    if method == "auto":
        method = "direct" if d == dims else "pca"  # PCA: fast and deterministic; ask for t-SNE by name
    if method == "direct" or (d == dims and method != "tsne"):
        return z[:, :dims], [f"z{i + 1}" for i in range(dims)], "direct"
    if method == "pca":
        pca = PCA(n_components=dims, random_state=seed).fit(z)
        var = pca.explained_variance_ratio_
        return pca.transform(z), [f"PC{i + 1} ({100 * v:.0f}% var)" for i, v in enumerate(var)], "PCA"
    if method == "tsne":
        if np.ptp(z, axis=0).max(initial=0.0) <= 1e-12 or not np.isfinite(z).all():
            # A collapsed latent (every point equal: dead ReLUs) or a non-finite one crashes scikit-learn's
            # Barnes-Hut t-SNE (a segfault, not an exception): nothing to embed, all points at the origin.
            return np.zeros((len(z), dims)), [f"t-SNE {i + 1} (latents collapsed)" for i in range(dims)], "t-SNE"
        # perplexity must stay below N; ~N/3 keeps tiny probe sets well-posed.
        perplexity = float(max(2.0, min(30.0, (len(z) - 1) / 3)))
        # One OpenMP thread: on a busy 2-core box (2 training ranks, other tests) t-SNE's spinning
        # threads were measured 100-300x slower on 45 points (26 s vs 0.08 s); one thread is predictable.
        with threadpool_limits(limits=1, user_api="openmp"):
            tsne = TSNE(n_components=dims, perplexity=perplexity, init="pca", random_state=seed)
            emb = tsne.fit_transform(z)
        return emb, [f"t-SNE {i + 1}" for i in range(dims)], "t-SNE"
    raise ValueError(f"unknown method {method!r}; use auto, pca or tsne")


def _class_colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def latent_scatter(
    z: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    method: str = "auto",
    dims: int = 2,
    seed: int = 0,
    title: str | None = None,
) -> np.ndarray:
    """Scatter of latents ``z`` ``[N, D]`` coloured by ``labels`` ``[N]`` with a class legend.

    ``method``: "auto" plots D == dims directly and projects larger D with PCA; "pca" or "tsne"
    force a projection (sklearn). ``dims`` is 2 or 3. Spatial latents ``[N, C, h, w]`` are flattened
    to ``[N, C·h·w]`` vectors first, and the default title says so.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    zt = torch.as_tensor(z).detach().to("cpu", torch.float64)
    zz = rearrange(zt, "n ... -> n (...)").numpy()
    flat = "" if zt.dim() <= 2 else f"{'x'.join(map(str, zt.shape[1:]))} flattened to "
    y = torch.as_tensor(labels).detach().cpu().numpy().ravel()
    pts, axis_names, how = _project(zz, method, dims, seed)
    classes = np.unique(y)
    names = [class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(c) for c in classes]
    fig = _figure(760, 560)
    ax = fig.add_axes((0.09, 0.1, 0.66, 0.8), projection="3d" if dims == 3 else None)
    for colour, c, name in zip(_class_colours(len(classes)), classes, names):
        sel = y == c
        ax.scatter(*pts[sel].T, s=10 if len(y) > 500 else 22, color=colour, alpha=0.75, label=name, linewidths=0)
    for setter, name in zip((ax.set_xlabel, ax.set_ylabel, getattr(ax, "set_zlabel", None)), axis_names):
        setter(name)
    fig.legend(loc="center left", bbox_to_anchor=(0.77, 0.5), markerscale=2, frameon=False, title="class")
    ax.set_title(title or f"Latent space, {flat}D={zz.shape[1]} ({how}), N={len(y)}")
    return fig_to_array(fig)


def rotation_panel(
    images_in: Tensor,
    decoded: Tensor,
    z_path: Tensor,
    class_names: Sequence[str],
    angles: Sequence[float] | np.ndarray | Tensor,
    title: str | None = None,
) -> np.ndarray:
    """Seed 000 figs 4–6: rotated inputs and their decodes per class, and each class's latent path.

    Args:
        images_in, decoded: ``[K, A, C, H, W]`` — K classes, A rotation angles, values in [0, 1].
        z_path: ``[K, A, D]`` latents of ``images_in``; D > 2 is shown through a joint PCA.
        angles: ``[A]`` degrees shared by all classes, or ``[K, A]`` per image (random rotations).
    """
    k, a, c, h, w = images_in.shape
    rows = torch.stack([torch.as_tensor(images_in), torch.as_tensor(decoded)], dim=1)  # [K, 2, A, C, H, W]
    grid = image_grid(rows.reshape(k * 2 * a, c, h, w), nrow=a)
    ang = torch.as_tensor(angles, dtype=torch.float64).cpu().numpy().reshape(-1, a)
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(k)]
    gh, gw = grid.shape[:2]
    zoom = max(1, min(4, 520 // max(gh, gw) + 1))
    left_w, plot_w, height = gw * zoom + 120, 520, max(gh * zoom + 90, 480)
    fig = _figure(left_w + plot_w, height)
    ax = fig.add_axes((110 / (left_w + plot_w), 40 / height, gw * zoom / (left_w + plot_w), gh * zoom / height))
    ax.imshow(grid, interpolation="nearest")
    ys = _cell_centres(2 * k, h)
    ax.set_yticks(ys, [f"{n} {kind}" for n in names for kind in ("in", "out")], fontsize=9)
    xs = _cell_centres(a, w)
    if ang.shape[0] == 1:
        ax.set_xticks(xs, [f"{v:g}°" for v in ang[0]], fontsize=8)
    else:  # per-image angles: write each inside its input image, outlined so it reads on black and white
        ax.set_xticks([])
        for i in range(k):
            for j in range(a):
                ax.text(xs[j] - w / 2 + 0.5, ys[2 * i] - h / 2 + 0.5, f"{ang[i, j]:.0f}°", ha="left", va="top", fontsize=7,
                        color="w", path_effects=[withStroke(linewidth=2, foreground="k")])
    _bare(ax)

    zp = torch.as_tensor(z_path).detach().to("cpu", torch.float64).reshape(k * a, -1).numpy()
    pts, axis_names, _ = _project(zp, "auto", 2, seed=0)  # one PCA over all classes when D > 2
    pts = pts.reshape(k, a, 2)
    pax = fig.add_axes(((left_w + 55) / (left_w + plot_w), 0.12, (plot_w - 80) / (left_w + plot_w), 0.76))
    for i, colour in enumerate(_class_colours(k)):
        order = np.argsort(ang[min(i, len(ang) - 1)])  # a path follows increasing angle
        p = pts[i][order]
        pax.plot(p[:, 0], p[:, 1], "-o", color=colour, ms=4, lw=1, label=names[i])
        pax.plot(p[0, 0], p[0, 1], "*", color=colour, ms=13, mec="k", mew=0.5)
        if a <= 12:
            for j, (x, y) in zip(order, p):
                pax.annotate(f"{ang[min(i, len(ang) - 1), j]:.0f}°", (x, y), fontsize=6, alpha=0.8,
                             xytext=(3, 3), textcoords="offset points")
    pax.set_xlabel(axis_names[0])
    pax.set_ylabel(axis_names[1])
    pax.set_title("Latent path over rotation (★ = smallest angle)", fontsize=10)
    pax.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "Rotated inputs (in), their decodes (out) and latent paths", fontsize=12)
    return fig_to_array(fig)


def interpolate_latents(z0: Tensor, z1: Tensor, steps: int = 8) -> Tensor:
    """Linear path ``[steps + 2, *z0.shape]`` from ``z0`` to ``z1``, both endpoints exact."""
    t = torch.linspace(0.0, 1.0, steps + 2, dtype=z0.dtype, device=z0.device).reshape(-1, *([1] * z0.dim()))
    # (1 - t)·z0 + t·z1 rather than z0 + t·(z1 − z0): the latter misses z1 by rounding at t = 1.
    return (1 - t) * z0 + t * z1.to(z0)


def interpolation_strip(
    decoded: Tensor,
    title: str | None = "Latent interpolation",
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Decodes along a latent path: ``[S + 2, C, H, W]`` (start, S steps, end) or ``[R, S + 2, C, H, W]``."""
    x = torch.as_tensor(decoded)
    x = x[None] if x.dim() == 4 else x
    r, s2, c, h, w = x.shape
    grid = image_grid(x.reshape(r * s2, c, h, w), nrow=s2)
    cols = ["start"] + [f"{t:.2f}" for t in np.linspace(0, 1, s2)[1:-1]] + ["end"]
    rl = list(row_labels) if row_labels is not None else []
    return _show_grid(grid, title, rl, _cell_centres(len(rl), h), cols, _cell_centres(s2, w))


def prior_samples(decoded: Tensor, nrow: int | None = None, title: str | None = "Decodes of z ~ N(0, I)") -> np.ndarray:
    """Grid of decoded prior samples ``[N, C, H, W]`` (about square when ``nrow`` is None)."""
    n = len(decoded)
    return _show_grid(image_grid(decoded, nrow=nrow or math.ceil(math.sqrt(n))), title, min_width=400)


def class_samples(images: Tensor, labels: Tensor, class_names: Sequence[str], per_class: int = 3,
                  title: str | None = "Samples per class") -> np.ndarray:
    """One row per class present in ``labels``: its first ``per_class`` images ``[N, C, H, W]`` in [0, 1]
    (white cells where a class has fewer), labelled with the class name: a look at the data itself."""
    classes = torch.unique(labels).tolist()
    blank = torch.ones_like(images[:1])
    cells = []
    for c in classes:
        mine = images[labels == c][:per_class]
        cells += [mine, *([blank] * (per_class - len(mine)))]
    h = images.shape[-2]
    names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    return _show_grid(image_grid(torch.cat(cells), nrow=per_class), title, names, _cell_centres(len(classes), h), min_width=240)


def latent_plane(grid: int = 8, extent: float = 3.0) -> Tensor:
    """``[G*G, 2]`` points on a G×G lattice over [-extent, extent]²; row-major, top row = largest z2.

    This order makes ``make_grid(decode(latent_plane(G, e)), nrow=G)`` look like the z1–z2 plane.
    """
    axis = torch.linspace(-extent, extent, grid)
    z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    return torch.stack([z1, z2], dim=-1).reshape(-1, 2)


def latent_grid(decoded: Tensor, extent: float = 3.0, title: str | None = "Decodes over the latent plane") -> np.ndarray:
    """Decodes of :func:`latent_plane` points ``[G*G, C, H, W]`` shown on z1/z2 axes."""
    g = math.isqrt(len(decoded))
    if g * g != len(decoded):
        raise ValueError(f"expected G*G decodes, got {len(decoded)}")
    grid = image_grid(decoded, nrow=g, padding=0)
    half = extent / max(g - 1, 1)  # half a cell: lattice points sit at the cell centres
    fig = _figure(620, 600)
    ax = fig.add_axes((0.1, 0.08, 0.85, 0.84))
    ax.imshow(grid, interpolation="nearest", extent=(-extent - half, extent + half, -extent - half, extent + half))
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    if title:
        ax.set_title(title)
    return fig_to_array(fig)


_SPLIT_STYLE = {"train": "-", "val": "--", "test": ":"}


def loss_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    title: str = "Loss",
    log_y: bool = False,
) -> np.ndarray:
    """Several runs' curves in one plot: colour per run, line style per split.

    ``curves``: run name -> {"train/loss": [(epoch, value), …], "val/loss": […], "test/loss": […]}.
    """
    fig = _figure(820, 520)
    ax = fig.add_axes((0.09, 0.11, 0.62, 0.8))
    splits: dict[str, str] = {}
    colours = _class_colours(len(curves))
    for colour, series in zip(colours, curves.values()):
        for key, points in series.items():
            if not points:
                continue
            split = key.split("/")[0]
            style = splits.setdefault(split, _SPLIT_STYLE.get(split, ["-.", (0, (1, 3))][len(splits) % 2]))
            xs, ys = zip(*points)
            ax.plot(xs, ys, linestyle=style, color=colour, lw=1.6, marker="o" if len(xs) < 3 else None)
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(title.lower() if title else "value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    run_handles = [Line2D([], [], color=c, lw=2, label=r) for c, r in zip(colours, curves)]
    split_handles = [Line2D([], [], color="k", linestyle=s, label=n) for n, s in splits.items()]
    fig.legend(handles=run_handles, loc="upper left", bbox_to_anchor=(0.73, 0.9), frameon=False, title="run")
    fig.legend(handles=split_handles, loc="lower left", bbox_to_anchor=(0.73, 0.12), frameon=False, title="split")
    return fig_to_array(fig)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``[H, W, 3]`` (or ``[H, W]``) array as PNG, creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(out, format="PNG")
    return out
