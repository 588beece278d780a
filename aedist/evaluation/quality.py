"""The metrics chosen by ``eval.metrics``, summed exactly over batches and ranks, then finalized once.

    q = QualityTally(["mse", "ssim", "rfid", "kl_channel"], lpips_net="alex")
    for ...:
        q.add("test", pred, target, out)        # pixels [B, C, H, W] in [0, 1]; out: the AEOutput (mu/logvar) or None
    values = q.reduce(["test"], all_reduce_sum, gather)["test"]   # {"mse": …, "ssim": …, "rfid": …, "kl_ch0": …}

Every metric turns a batch into float64 sums (per-image values and a count; feature sums and outer
products for rFID; sums of mu and mu² for active units) and the final values come from the sums
alone, so one all-reduce of every sum gives the same numbers as one process that saw every image.
``mse``/``psnr_db``/``snr_db`` (and any extension in :data:`aedist.metrics.METRICS`) are computed by
``aedist.metrics`` exactly as before. The README's "Image quality metrics" says what each one is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from einops import reduce
from torch import Tensor

from aedist import metrics
from aedist.evaluation.backbones import load_backbone
from aedist.evaluation.image_metrics import frechet_distance, lpips_distance, ms_ssim, ms_ssim_scales, quantize_8bit, rgb, ssim
from aedist.models.vae import LOGVAR_CLAMP
from aedist.registry import Registry

Sums = dict[str, Tensor]
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Var_x(E_q[u|x]) > 0.01
KL_CHANNEL_CAP = 32  # more latent units than this: log their mean and max KL instead of one key each


class Metric(Protocol):
    """One metric: a batch -> float64 sums to add up; the (reduced) sums -> named values."""

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums: ...

    def finalize(self, sums: Sums) -> dict[str, float]: ...


@dataclass
class QualityOptions:
    lpips_net: str = "alex"


# name -> factory(options) -> Metric. Names must not repeat those of aedist.metrics.METRICS.
QUALITY: Registry[Callable[[QualityOptions], Metric]] = Registry("metric")


def known_metrics() -> list[str]:
    """Every name ``eval.metrics`` accepts: METRICS' per-pixel ones and this module's."""
    return sorted({*metrics.METRICS, *QUALITY})


def check_metric_names(names: Sequence[str], key: str = "eval.metrics") -> None:
    """UserError naming the known metrics (and the closest one) for a name no registry holds."""
    known: Registry[None] = Registry("metric")
    for name in known_metrics():
        known.register(name)(None)
    for name in names:
        known.get(name, key=key)


def _count(x: Tensor) -> Tensor:
    return torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)


class PixelMetrics:
    """The selected entries of ``aedist.metrics.METRICS`` (mse, psnr_db, snr_db, …), unchanged."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        return metrics.batch_sums(pred, target, self.names)

    def finalize(self, sums: Sums) -> dict[str, float]:
        if not sums:  # no rank saw an image of this set: NaN, as before
            sums = {k: torch.tensor(0.0) for k in metrics.sum_keys(self.names)}
        return {k.split("/", 1)[1]: v for k, v in metrics.finalize(sums, "_", self.names).items()}


class PerImage:
    """Mean over images of ``fn(pred, target) -> [B]``, on 8-bit rounded images."""

    def __init__(self, name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.name, self.fn = name, fn

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        vals = self.fn(quantize_8bit(pred), quantize_8bit(target).to(pred.device))
        return {"sum": vals.detach().double().sum(), "n": _count(pred)}

    def finalize(self, sums: Sums) -> dict[str, float]:
        n = float(sums["n"]) if sums else 0.0
        return {self.name: float(sums["sum"]) / n if n > 0 else float("nan")}


class MultiScale(PerImage):
    """MS-SSIM, plus ``ms_ssim_scales``: how many scales the images allowed (a sum over images like
    the value itself, so ranks and batches add up to the same number)."""

    def __init__(self) -> None:
        super().__init__("ms_ssim", ms_ssim)

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        sums = super().update(pred, target, out)
        return {**sums, "scales": sums["n"] * ms_ssim_scales(*pred.shape[-2:])}

    def finalize(self, sums: Sums) -> dict[str, float]:
        n = float(sums["n"]) if sums else 0.0
        return {**super().finalize(sums), **({"ms_ssim_scales": float(sums["scales"]) / n} if n > 0 else {})}


class FrechetInception:
    """rFID: Fréchet distance between the Inception pool features of reconstructions and of their
    targets, from feature sums and sums of outer products (float64), i.e. from every rank's images."""

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        net = load_backbone("inception", "", pred.device)
        sums: Sums = {"n": _count(pred)}
        for side, x in (("pred", pred), ("target", target.to(pred.device))):
            f = net(rgb(quantize_8bit(x))).double()
            sums[f"{side}_sum"], sums[f"{side}_outer"] = f.sum(dim=0), f.T @ f
        return sums

    def finalize(self, sums: Sums) -> dict[str, float]:
        n = float(sums["n"]) if sums else 0.0
        if n < 2:
            return {"rfid": float("nan")}
        stats = []
        for side in ("pred", "target"):
            s, outer = sums[f"{side}_sum"].cpu().numpy(), sums[f"{side}_outer"].cpu().numpy()
            mu = s / n
            stats += [mu, (outer - n * np.outer(mu, mu)) / (n - 1)]  # unbiased, as np.cov in pytorch-fid
        return {"rfid": frechet_distance(*stats)}


def _posterior(out: Any) -> tuple[Tensor, Tensor] | None:
    mu, logvar = getattr(out, "mu", None), getattr(out, "logvar", None)
    return None if mu is None or logvar is None else (mu.detach().double(), logvar.detach().double())


class KLPerChannel:
    """KL(q(z|x) || N(0, I)) per latent channel (spatial [B, C, h, w]: summed over h, w) or per unit
    (flat [B, D]), mean over images. Models without mu/logvar report nothing."""

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        post = _posterior(out)
        if post is None:
            return {}
        mu, logvar = post[0], post[1].clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)  # the clamp the KL loss uses
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
        return {"kl": reduce(kl, "b c ... -> c", "sum"), "n": _count(mu)}

    def finalize(self, sums: Sums) -> dict[str, float]:
        if not sums or float(sums["n"]) == 0:
            return {}
        per = (sums["kl"] / sums["n"]).tolist()
        if len(per) <= KL_CHANNEL_CAP:
            return {f"kl_ch{c}": v for c, v in enumerate(per)}
        return {"kl_ch_mean": float(np.mean(per)), "kl_ch_max": float(np.max(per))}


class ActiveUnits:
    """Burda et al. 2016: units with Var_x(E_q[u|x]) > 0.01 (unbiased variance over the data of mu).
    Flat [B, D]: each of the D units. Spatial [B, C, h, w]: a unit is a channel, its variance the mean
    over the h*w positions of each position's variance over the data."""

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        post = _posterior(out)
        if post is None:
            return {}
        mu = post[0]
        return {"mu": mu.sum(dim=0), "mu2": mu.square().sum(dim=0), "n": _count(mu)}

    def finalize(self, sums: Sums) -> dict[str, float]:
        if not sums:
            return {}
        n = float(sums["n"])
        if n < 2:
            return {"active_units": float("nan")}
        var = (sums["mu2"] - sums["mu"].square() / n) / (n - 1)
        return {"active_units": float((reduce(var, "c ... -> c", "mean") > ACTIVE_THRESHOLD).sum())}


class Variety:
    """How much the outputs differ from image to image, against the targets: sqrt(sum over pixels of
    Var_images(pred) / sum over pixels of Var_images(target)), unbiased variances from Σx and Σx² per
    pixel. 0: one output for every input (a model stuck at the mean image, e.g. after its ReLUs died);
    about 1: as varied as the data. MSE alone cannot tell a collapsed model from a weak one."""

    def update(self, pred: Tensor, target: Tensor, out: Any) -> Sums:
        p, t = pred.detach().double(), target.detach().to(pred.device).double()
        return {"p": p.sum(dim=0), "p2": p.square().sum(dim=0), "t": t.sum(dim=0), "t2": t.square().sum(dim=0), "n": _count(p)}

    def finalize(self, sums: Sums) -> dict[str, float]:
        n = float(sums["n"]) if sums else 0.0
        if n < 2:
            return {"variety": float("nan")}
        var_p, var_t = ((sums[f"{k}2"] - sums[k].square() / n).sum() / (n - 1) for k in ("p", "t"))
        return {"variety": float((var_p.clamp(min=0) / var_t).sqrt()) if float(var_t) > 0 else float("nan")}


QUALITY.register("ssim")(lambda opts: PerImage("ssim", ssim))
QUALITY.register("ms_ssim")(lambda opts: MultiScale())
QUALITY.register("lpips")(lambda opts: PerImage("lpips", lambda a, b: lpips_distance(a, b, opts.lpips_net)))
QUALITY.register("rfid")(lambda opts: FrechetInception())
QUALITY.register("kl_channel")(lambda opts: KLPerChannel())
QUALITY.register("active_units")(lambda opts: ActiveUnits())
QUALITY.register("variety")(lambda opts: Variety())

Key = tuple[str, str, str]  # (set, metric, sum name)
Layout = list[tuple[Key, tuple[int, ...]]]


class QualityTally:
    """Sums of every selected metric for every named set (``"test"``, ``"test_rotated"``, …) on this
    rank; :meth:`reduce` (or layout/flat/finalize around a caller's own all-reduce) finishes them."""

    def __init__(self, names: Sequence[str], lpips_net: str = "alex") -> None:
        names = list(dict.fromkeys(names))
        check_metric_names(names)
        opts = QualityOptions(lpips_net=lpips_net)
        pixel = [n for n in names if n in metrics.METRICS]
        self.metrics: dict[str, Metric] = {"_pixel": PixelMetrics(pixel)} if pixel else {}
        self.metrics.update({n: QUALITY.get(n)(opts) for n in names if n not in metrics.METRICS})
        self.sums: dict[Key, Tensor] = {}

    def add(self, set_name: str, pred: Tensor, target: Tensor, out: Any = None) -> None:
        """Add one batch: ``pred``/``target`` pixels ``[B, C, H, W]`` in [0, 1]; ``out`` the model
        output whose ``mu``/``logvar`` the latent metrics read (None: they skip this set)."""
        for name, metric in self.metrics.items():
            for k, v in metric.update(pred, target, out).items():
                key = (set_name, name, k)
                self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    def layout(self, gather: Callable[[Any], list[Any]]) -> Layout:
        """Every rank's sums' keys and shapes, agreed through ``gather(obj) -> [obj of each rank]``:
        a rank that saw no batch (or no VAE output) still joins the all-reduce with zeros."""
        merged: dict[Key, tuple[int, ...]] = {}
        for part in gather(sorted((k, tuple(v.shape)) for k, v in self.sums.items())):
            merged.update(dict(part))
        return sorted(merged.items())

    def flat(self, layout: Layout, device: torch.device | str) -> Tensor:
        """This rank's sums as one float64 vector in ``layout`` order (zeros where it has none)."""
        parts = [self.sums[k].to(device, torch.float64).flatten() if k in self.sums else torch.zeros(int(np.prod(s)), dtype=torch.float64, device=device)
                 for k, s in layout]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)

    def finalize(self, set_names: Sequence[str], layout: Layout, total: Tensor) -> dict[str, dict[str, float]]:
        """Values per set from the all-reduced ``flat`` vector: ``{set: {"mse": …, "ssim": …}}``."""
        grouped: dict[tuple[str, str], Sums] = {}
        offset = 0
        for (set_name, name, k), shape in layout:
            size = int(np.prod(shape))
            grouped.setdefault((set_name, name), {})[k] = total[offset:offset + size].reshape(shape)
            offset += size
        out: dict[str, dict[str, float]] = {}
        for set_name in set_names:
            out[set_name] = {}
            for name, metric in self.metrics.items():
                out[set_name].update(metric.finalize(grouped.get((set_name, name), {})))
        return out

    def reduce(self, set_names: Sequence[str], all_reduce: Callable[[Tensor], Tensor], gather: Callable[[Any], list[Any]],
               device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
        """Agree on the layout, sum every rank's sums in one ``all_reduce``, finalize."""
        layout = self.layout(gather)
        return self.finalize(set_names, layout, all_reduce(self.flat(layout, device)))
