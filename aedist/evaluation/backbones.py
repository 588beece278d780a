"""Pretrained feature networks of the perceptual metrics (LPIPS's AlexNet/VGG, the FID Inception):
where their weights live, a start-up check that they are there, and one place tests swap them.

    check_backbones(["mse", "lpips", "rfid"], lpips_net="alex")   # UserError naming the missing file
    net = load_backbone("inception", "", device)                    # [B, 3, H, W] in [0, 1] -> [B, 2048]

The weights are the libraries' own downloads (torchvision's AlexNet/VGG16, pytorch-fid's
pt_inception-2015-12-05) in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``).
A run never downloads them itself: on a cluster without network a download would hang or fail in
the middle of training, so a missing file is refused at start and ``launch/fetch_weights.py``
(run once where there is network) puts them there. Tests replace an entry of :data:`BACKBONES` with a
tiny network; the metrics reach every backbone through :func:`load_backbone`, real or not.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from einops import rearrange
from torch import nn

from aedist.errors import UserError

LPIPS_NETS = ("alex", "vgg")
# Which metric needs which backbone kind (the other metrics need none).
METRIC_BACKBONE = {"lpips": "lpips", "rfid": "inception"}


def _lpips_trunk(variant: str) -> nn.Module:
    """The reference LPIPS (linear heads from the package, trunk from torchvision): ``(a, b)`` in
    [-1, 1], ``[B, 3, H, W]`` each -> ``[B, 1, 1, 1]``."""
    import lpips

    require_weights("lpips", variant)  # torchvision would otherwise try to download the trunk
    with warnings.catch_warnings():  # lpips still calls tv.alexnet(pretrained=True): deprecated, same weights
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net=variant, verbose=False)


class _PoolFeatures(nn.Module):
    """pytorch-fid's InceptionV3 reduced to its 2048-d pool features: ``[B, 3, H, W]`` in [0, 1] ->
    ``[B, 2048]``; it resizes to 299x299 (bilinear) and scales to [-1, 1] itself, as pytorch-fid does."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.net(x)[0], "b f 1 1 -> b f")


def _fid_inception(variant: str) -> nn.Module:
    require_weights("rfid", variant)
    return _PoolFeatures()


# kind -> factory(variant) -> module. Tests swap an entry (monkeypatch.setitem) for a tiny network;
# an entry that is not the shipped one needs no weights file (check_backbones skips it).
BACKBONES: dict[str, Callable[[str], nn.Module]] = {"lpips": _lpips_trunk, "inception": _fid_inception}
_SHIPPED = dict(BACKBONES)
_LOADED: dict[tuple[str, str, Callable[[str], nn.Module], str], nn.Module] = {}


def load_backbone(kind: str, variant: str, device: torch.device | str) -> nn.Module:
    """The frozen, eval-mode backbone ``kind`` ('lpips' or 'inception') on ``device``, built once per
    process (an eval every epoch must not rebuild AlexNet or Inception)."""
    factory = BACKBONES[kind]
    key = (kind, variant, factory, str(device))
    if key not in _LOADED:
        _LOADED[key] = factory(variant).eval().requires_grad_(False).to(device)
    return _LOADED[key]


def weights_dir() -> Path:
    """Where torch.hub keeps downloaded weights: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weight_urls(metric: str, lpips_net: str = "alex") -> list[str]:
    """The download URLs of the weights ``metric`` needs, taken from the libraries themselves so they
    never drift from what those libraries load (their file name is the URL's last part)."""
    try:
        if metric == "lpips":
            from torchvision.models import AlexNet_Weights, VGG16_Weights

            # lpips builds its trunk with tv.alexnet/vgg16(pretrained=True), i.e. these IMAGENET1K_V1 files.
            return [{"alex": AlexNet_Weights, "vgg": VGG16_Weights}[lpips_net].IMAGENET1K_V1.url]
        if metric == "rfid":
            from pytorch_fid.inception import FID_WEIGHTS_URL

            return [FID_WEIGHTS_URL]
    except ImportError as err:
        pkg = {"lpips": "lpips", "rfid": "pytorch-fid"}[metric]
        raise UserError(f"eval.metrics '{metric}' needs the package {pkg} ({err}); pip install {pkg}") from None
    return []


def _lpips_heads(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"  # shipped inside the package


def require_weights(metric: str, lpips_net: str = "alex") -> None:
    """Raise a one-line UserError unless every weights file ``metric`` needs is on disk."""
    if metric == "lpips" and lpips_net not in LPIPS_NETS:
        raise UserError(f"eval.lpips_net '{lpips_net}' is not one of {', '.join(LPIPS_NETS)}")
    folder = weights_dir()
    for url in weight_urls(metric, lpips_net):
        name = os.path.basename(urlparse(url).path)
        if not (folder / name).is_file():
            net = f" --lpips-net {lpips_net}" if metric == "lpips" else ""
            raise UserError(
                f"eval.metrics '{metric}' needs the pretrained weights {name}, not found in {folder} "
                f"(torch.hub.get_dir()/checkpoints, i.e. $TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}) "
                f"and runs never download them; run `python launch/fetch_weights.py --metrics {metric}{net}` on a machine with "
                f"network, then copy that checkpoints folder here (or point TORCH_HOME at a copy)")
    if metric == "lpips" and not _lpips_heads(lpips_net).is_file():
        raise UserError(f"the lpips package has no linear heads {_lpips_heads(lpips_net)}; reinstall it: pip install --force-reinstall lpips")


def check_backbones(metric_names: Sequence[str], lpips_net: str = "alex", image_hw: tuple[int, int] | None = None) -> None:
    """Refuse at start-up (before step 1), in one line, when a metric of ``metric_names`` needs
    pretrained weights that are not in :func:`weights_dir`, or (given ``image_hw``, the images'
    height and width) cannot measure images that small. Backbones swapped in :data:`BACKBONES`
    (tests' stand-ins) need no file."""
    if image_hw is not None:
        from aedist.evaluation.image_metrics import check_image_size  # that module imports this one

        check_image_size(metric_names, *image_hw)
    for metric in dict.fromkeys(metric_names):
        kind = METRIC_BACKBONE.get(metric)
        if kind is not None and BACKBONES[kind] is _SHIPPED[kind]:
            require_weights(metric, lpips_net)


def fetch_backbones(metric_names: Sequence[str], lpips_net: str = "alex") -> list[Path]:
    """Download the weights of ``metric_names`` into :func:`weights_dir` with the libraries' own
    download functions (needs network); returns the files. Files already there are not fetched again."""
    for metric in dict.fromkeys(metric_names):
        try:
            if metric == "lpips":
                from torchvision.models import AlexNet_Weights, VGG16_Weights

                {"alex": AlexNet_Weights, "vgg": VGG16_Weights}[lpips_net].IMAGENET1K_V1.get_state_dict(progress=True)
            elif metric == "rfid":
                from pytorch_fid.inception import FID_WEIGHTS_URL

                torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)  # as pytorch-fid's fid_inception_v3 does
        except OSError as err:  # URLError, a refused connection, a full disk
            raise UserError(f"could not fetch the weights of '{metric}' ({err}); run this on a machine with network "
                            f"and free space in {weights_dir()}") from None
    check_backbones(metric_names, lpips_net)
    return [weights_dir() / os.path.basename(urlparse(u).path) for m in dict.fromkeys(metric_names) for u in weight_urls(m, lpips_net)]
