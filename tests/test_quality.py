"""eval.metrics against independent references: SSIM vs scikit-image, MS-SSIM vs pytorch-msssim, rFID vs
pytorch-fid's Fréchet distance on the same features, 2 gloo ranks vs 1, per-channel KL and active units
by hand, the offline weights check, and the metrics through evaluate_split.

No pretrained weights exist on this machine: the Inception and LPIPS trunks are swapped through
``backbones.BACKBONES``, the same lookup the shipped ones go through.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from einops import repeat
from torch import nn

from aedist.config import load_config
from aedist.errors import UserError
from aedist.evaluation import backbones
from aedist.evaluation.image_metrics import lpips_distance, ms_ssim, ms_ssim_scales, ssim
from aedist.evaluation.quality import KL_CHANNEL_CAP, QualityTally
from aedist.models import AEOutput

ALL = ["mse", "psnr_db", "snr_db", "ssim", "ms_ssim", "rfid", "kl_channel", "active_units", "variety"]


def _tiny_inception(variant: str) -> nn.Module:
    """Stand-in for the FID Inception: [B, 3, H, W] in [0, 1] -> [B, 6], the same weights in every process."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def _images(n: int, channels: int, size: int, seed: int, structured: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit (target, pred) pairs in [0, 1]: uniform noise, or smooth gradients and discs with a
    noisy, slightly shifted reconstruction."""
    rng = np.random.default_rng(seed)
    if structured:
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([(0.5 + 0.4 * np.sin(2 * np.pi * (k + 1) * xx) * np.cos(2 * np.pi * yy)) * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 > 0.05)
                         for k in range(n * channels)]).reshape(n, channels, size, size)
        pred = np.roll(base, 1, axis=-1) + rng.normal(0, 0.05, base.shape)
    else:
        base, pred = rng.random((n, channels, size, size)), rng.random((n, channels, size, size))
        pred = 0.6 * base + 0.4 * pred
    q = [torch.from_numpy(np.round(np.clip(v, 0, 1) * 255) / 255).float() for v in (base, pred)]
    return q[0], q[1]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("structured", [False, True])
def test_ssim_equals_scikit_image(channels: int, structured: bool) -> None:
    from skimage.metrics import structural_similarity

    target, pred = _images(4, channels, 32, seed=channels, structured=structured)
    ref = [structural_similarity(t.numpy(), p.numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=0) for t, p in zip(target, pred)]
    np.testing.assert_allclose(ssim(pred, target).numpy(), ref, atol=1e-4)
    tally = QualityTally(["ssim"])
    tally.add("t", pred[:3], target[:3])
    tally.add("t", pred[3:], target[3:])
    assert tally.reduce(["t"], lambda x: x, lambda o: [o])["t"]["ssim"] == pytest.approx(np.mean(ref), abs=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("structured", [False, True])
def test_ms_ssim_five_scales_equals_pytorch_msssim(channels: int, structured: bool) -> None:
    from pytorch_msssim import ms_ssim as reference

    target, pred = _images(2, channels, 176, seed=5 + channels, structured=structured)
    assert ms_ssim_scales(176, 176) == 5
    ref = reference(pred, target, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5, K=(0.01, 0.03))
    np.testing.assert_allclose(ms_ssim(pred, target).numpy(), ref.numpy(), atol=1e-4)


def test_ms_ssim_on_small_images_uses_the_scales_that_fit_with_renormalized_betas() -> None:
    # pytorch-msssim's ms_ssim refuses images <= 160 px whatever the weights, so the 3-scale reference
    # is built here from its per-scale SSIM/CS (_ssim), 2x2 average pooling and betas[:3] / their sum.
    ssim_mod = importlib.import_module("pytorch_msssim.ssim")
    target, pred = _images(3, 3, 64, seed=9, structured=True)
    betas = torch.tensor([0.0448, 0.2856, 0.3001], dtype=torch.float64)
    betas = betas / betas.sum()
    win = repeat(ssim_mod._fspecial_gauss_1d(11, 1.5), "1 1 k -> c 1 1 k", c=3)
    x, y, levels = pred.double(), target.double(), []
    for level in range(3):
        s, cs = ssim_mod._ssim(x, y, data_range=1.0, win=win.double(), size_average=False, K=(0.01, 0.03))
        levels.append(torch.relu(cs if level < 2 else s))
        x, y = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2)
    ref = torch.prod(torch.stack(levels) ** betas.view(-1, 1, 1), dim=0).mean(dim=1)  # per channel, then mean
    assert ms_ssim_scales(64, 64) == 3
    np.testing.assert_allclose(ms_ssim(pred, target).numpy(), ref.numpy(), atol=1e-4)
    tally = QualityTally(["ms_ssim"])
    tally.add("t", pred, target)
    assert tally.reduce(["t"], lambda v: v, lambda o: [o])["t"]["ms_ssim_scales"] == 3.0


def test_ms_ssim_scale_count_and_refusal() -> None:
    assert [ms_ssim_scales(s, s) for s in (21, 28, 40, 41, 80, 81, 96, 160, 161, 512)] == [2, 2, 2, 3, 3, 4, 4, 4, 5, 5]
    assert ms_ssim_scales(28, 300) == 2  # the short side decides
    with pytest.raises(UserError, match="at least 21x21 px.*got 20x20.*remove ms_ssim from eval.metrics"):
        ms_ssim_scales(20, 20)
    with pytest.raises(UserError, match="'ssim' needs images of at least 11x11 px"):
        ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid's own sqrtm call, scipy >= 1.16
def test_rfid_equals_pytorch_fid_distance_of_the_same_features(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    monkeypatch.setitem(backbones.BACKBONES, "inception", _tiny_inception)
    target, pred = _images(40, 1, 24, seed=3, structured=True)
    tally = QualityTally(["rfid"])
    for a, b in ((0, 7), (7, 30), (30, 40)):  # uneven batches
        tally.add("t", pred[a:b], target[a:b])
    got = tally.reduce(["t"], lambda v: v, lambda o: [o])["t"]["rfid"]
    net = _tiny_inception("")
    with torch.no_grad():  # greyscale repeated to RGB, as pytorch-fid's loader converts to RGB
        fp, ft = (net(x.repeat(1, 3, 1, 1)).double().numpy() for x in (pred, target))
    ref = calculate_frechet_distance(fp.mean(0), np.cov(fp, rowvar=False), ft.mean(0), np.cov(ft, rowvar=False))
    assert ref > 0.01 and got == pytest.approx(ref, rel=1e-6)
    same = QualityTally(["rfid"])
    same.add("t", target, target)
    assert abs(same.reduce(["t"], lambda v: v, lambda o: [o])["t"]["rfid"]) < 1e-6


def _posterior_batch(n: int, seed: int) -> AEOutput:
    """mu/logvar [n, 4, 3, 3]: channel 0 varies a lot, 1 is constant, 2 varies by 0.001, 3 by about 0.05."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.0, 0.03, 0.22], dtype=torch.float64).view(1, 4, 1, 1)
    mu[:, 1] = 2.0
    logvar = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64) * 0.3 - 1.0
    return AEOutput(torch.zeros(n, 1, 24, 24), mu, mu, logvar)


def _split_run(names: list[str], rank: int, world: int, all_reduce, gather) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """This rank's share of 40 images in uneven batches; set 'only0' (the first 25) lives on rank 0, 'none' nowhere."""
    target, pred = _images(40, 3, 24, seed=11, structured=False)
    out = _posterior_batch(40, seed=12)
    bounds = {1: [(0, 16), (16, 32), (32, 40)], 2: [[(0, 10), (10, 20), (20, 25)], [(25, 33), (33, 40)]][rank]}[world]
    tally = QualityTally(names)
    for a, b in bounds:
        tally.add("test", pred[a:b], target[a:b], AEOutput(*(v[a:b] for v in out)))
    if rank == 0:
        tally.add("only0", pred[:25], target[:25])
    return tally.reduce(["test", "only0", "none"], all_reduce, gather)


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    backbones.BACKBONES["inception"] = _tiny_inception

    def gather(obj: object) -> list[object]:
        parts: list[object] = [None] * world
        dist.all_gather_object(parts, obj)
        return parts

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    values = _split_run(ALL, rank, world, all_reduce, gather)
    if rank == 0:
        torch.save(values, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backbones.BACKBONES, "inception", _tiny_inception)
    one = _split_run(ALL, 0, 1, lambda v: v, lambda o: [o])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt")
    assert set(two) == set(one) and all(set(two[k]) == set(one[k]) for k in one)
    assert {"rfid", "ssim", "ms_ssim", "kl_ch3", "active_units", "mse"} <= set(one["test"])
    for set_name, vals in one.items():
        for k, v in vals.items():
            if math.isnan(v):  # 'none': no rank saw an image
                assert math.isnan(two[set_name][k]), (set_name, k)
            else:
                assert two[set_name][k] == pytest.approx(v, rel=1e-7, abs=1e-9), (set_name, k)
    assert one["only0"]["rfid"] > 0 and "kl_ch0" not in one["only0"] and "kl_ch0" not in one["none"]


@pytest.mark.parametrize("spatial", [True, False])
def test_active_units_and_kl_per_channel_by_hand(spatial: bool) -> None:
    out = _posterior_batch(60, seed=1)
    if not spatial:  # flat [B, D]: each of the 36 units on its own (over the cap: mean and max KL)
        out = AEOutput(out.recon, *(v.flatten(1) for v in out[1:]))
    tally = QualityTally(["kl_channel", "active_units"])
    for a, b in ((0, 25), (25, 60)):
        tally.add("t", out.recon[a:b], out.recon[a:b], AEOutput(*(v[a:b] for v in out)))
    got = tally.reduce(["t"], lambda v: v, lambda o: [o])["t"]
    mu, lv = out.mu.numpy(), out.logvar.numpy()
    kl = 0.5 * (mu**2 + np.exp(lv) - 1 - lv)
    var = mu.var(axis=0, ddof=1)  # per unit / per (channel, position) over the 60 images
    if spatial:
        per_channel = kl.sum(axis=(2, 3)).mean(axis=0)
        assert [got[f"kl_ch{c}"] for c in range(4)] == pytest.approx(per_channel.tolist(), rel=1e-10)
        assert "kl_ch4" not in got
        assert got["active_units"] == float((var.mean(axis=(1, 2)) > 0.01).sum()) == 2.0  # channels 0 and 3
    else:
        assert 36 > KL_CHANNEL_CAP and "kl_ch0" not in got
        assert got["kl_ch_mean"] == pytest.approx(kl.mean(axis=0).mean(), rel=1e-10)
        assert got["kl_ch_max"] == pytest.approx(kl.mean(axis=0).max(), rel=1e-10)
        assert got["active_units"] == float((var > 0.01).sum())
    plain = QualityTally(["kl_channel", "active_units"])  # a deterministic AE: nothing to report
    plain.add("t", out.recon, out.recon, AEOutput(out.recon, out.z))
    assert plain.reduce(["t"], lambda v: v, lambda o: [o]) == {"t": {}}


def test_missing_backbone_weights_are_refused_naming_file_folder_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    backbones.check_backbones(["mse", "ssim", "ms_ssim", "kl_channel"])  # nothing pretrained needed
    for names, net, file in ((["mse", "lpips"], "alex", "alexnet-owt-7be5be79.pth"), (["lpips"], "vgg", "vgg16-397923af.pth"),
                             (["rfid"], "alex", "pt_inception-2015-12-05-6726825d.pth")):
        with pytest.raises(UserError) as err:
            backbones.check_backbones(names, lpips_net=net)
        msg = str(err.value)
        assert file in msg and str(folder) in msg and "TORCH_HOME" in msg and "python launch/fetch_weights.py" in msg and "\n" not in msg
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):  # the shipped factory checks too: no download attempt
        backbones.load_backbone("lpips", "alex", "cpu")
    folder.mkdir(parents=True)
    (folder / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    backbones.check_backbones(["lpips"])  # found where torch.hub looks
    monkeypatch.setitem(backbones.BACKBONES, "inception", _tiny_inception)
    backbones.check_backbones(["rfid"])  # a swapped-in backbone needs no file


def test_unknown_metric_name_is_a_user_error() -> None:
    from aedist.loading import load_config  # names are checked there (aedist.config: the schema alone)

    with pytest.raises(UserError, match=r"config key 'eval.metrics': unknown metric 'ssmi'; did you mean 'ssim'\?.*known: .*lpips.*rfid"):
        load_config(None, ["eval.metrics=[mse, ssmi]"])
    assert load_config(None, []).eval.metrics == ["mse", "psnr_db", "snr_db", "variety"]


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")  # lpips builds its trunk with the deprecated pretrained=
def test_lpips_feeds_the_reference_lpips_class_rgb_in_minus_one_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import lpips

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()  # random trunk: no download; heads from the package
    monkeypatch.setitem(backbones.BACKBONES, "lpips", lambda net: ref)
    target, pred = _images(3, 1, 28, seed=4, structured=True)  # greyscale 28 px: repeated to RGB, upsampled to 32
    up = [torch.nn.functional.interpolate(v.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", align_corners=False) for v in (pred, target)]
    with torch.no_grad():
        want = ref(up[0], up[1], normalize=True).flatten()  # normalize=True: lpips maps [0, 1] to [-1, 1] itself
        np.testing.assert_allclose(lpips_distance(pred, target).numpy(), want.numpy(), rtol=1e-5)
        assert float(lpips_distance(target, target).abs().max()) < 1e-6


def test_evaluate_split_reports_the_selected_metrics(tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator
    from skimage.metrics import structural_similarity

    from aedist.evaluation import evaluate_split
    from aedist.models import build_model

    monkeypatch.setitem(backbones.BACKBONES, "inception", _tiny_inception)
    base = [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "model.name=conv_vae", "model.latent_dim=4",
            "eval.corruptions={rot: [{rot90: {}}]}"]
    cfg = load_config(None, [*base, f"eval.metrics=[{', '.join(ALL)}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    acc = Accelerator(cpu=True)
    values, _ = evaluate_split(model, cfg, acc, "test")
    plain, _ = evaluate_split(model, load_config(None, base), acc, "test")
    assert {k: values[k] for k in plain} == plain  # mse/psnr/snr and the losses as before
    assert {"test/ssim", "test/ms_ssim", "test/rfid", "test/kl_ch3", "test/active_units", "test_rot/ssim", "test_rot/input_ssim"} <= set(values)
    assert values["test/ms_ssim_scales"] == 2.0 and "test_rot/kl_ch0" not in values  # latents only for clean inputs
    from aedist.evaluation.passes import eval_batches

    with torch.no_grad():
        x = torch.cat([im.float() / 255 for im, _ in eval_batches(cfg, acc, "test")])
        recon = np.round(model.eval()(x).recon.clamp(0, 1).numpy() * 255) / 255
    ref = [structural_similarity(t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0)
           for t, p in zip(x.numpy(), recon)]
    assert values["test/ssim"] == pytest.approx(np.mean(ref), abs=1e-4)
    assert 0 <= values["test/active_units"] <= 4


def test_variety_is_the_output_to_target_spread_over_images_and_zero_for_a_collapsed_model() -> None:
    target, pred = _images(40, 3, 16, seed=3, structured=True)
    tally = QualityTally(["variety"])
    for a, b in ((0, 15), (15, 40)):  # two batches: the sums, not a per-batch mean
        tally.add("t", pred[a:b], target[a:b])
        tally.add("mean", target.mean(dim=0, keepdim=True).expand(b - a, -1, -1, -1), target[a:b])  # the mean image for all
        tally.add("self", target[a:b], target[a:b])
    got = tally.reduce(["t", "mean", "self"], lambda v: v, lambda o: [o])
    want = (pred.double().var(dim=0).sum() / target.double().var(dim=0).sum()).sqrt()  # torch's unbiased var over images
    assert got["t"]["variety"] == pytest.approx(float(want), rel=1e-9)
    assert 0.5 < got["t"]["variety"] < 1.5
    assert got["mean"]["variety"] == pytest.approx(0.0, abs=1e-6) and got["self"]["variety"] == pytest.approx(1.0, rel=1e-12)
