"""Latent-diffusion-style KL autoencoders: diffusers' AutoencoderKL through aedist's interface, the
save_pretrained round trip of a trained model, EMA weights (exact after kill -9, evaluated beside the
raw ones, preferred by evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_engine import RunFn, kill_and_resume, max_diff, write_config

from aedist.config import ModelConfig
from aedist.errors import UserError
from aedist.models import build_model
from aedist.models.diffusers_kl import export_pretrained
from aedist.optim import find_ema_state

# The Stable Diffusion VAE's config.json (runwayml/stable-diffusion-v1-5, vae/), as diffusers reads it.
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}


def test_sd_vae_config_gives_diffusers_own_tensors() -> None:
    torch.manual_seed(0)
    ours = build_model(ModelConfig(name="diffusers_kl", in_channels=3, image_size=32, params={
        k: SD_VAE[k] for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "act_fn")}))
    ref = AutoencoderKL(**SD_VAE)
    ref.load_state_dict(ours.vae.state_dict())  # same weights: only the interface differs
    ours.eval()
    ref.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mu, logvar = ours.moments(x)
        assert ours.latent_shape == (4, 4, 4) and mu.shape == (2, 4, 4, 4)
        assert torch.equal(mu, post.mean) and torch.equal(logvar, post.logvar)
        assert torch.equal(ours.encode(x), post.mean)
        z = torch.randn(2, 4, 4, 4)
        assert torch.equal(ours.decode(z), ref.decode(z).sample)
        out = ours(x)  # eval mode: z is the posterior mean, as diffusers' mode()
        assert torch.equal(out.recon, ref.decode(post.mode()).sample) and torch.equal(out.z, post.mean)
    ours.train()
    torch.manual_seed(1)
    sampled = ours(x)
    torch.manual_seed(1)
    assert torch.allclose(sampled.z, post.mean + torch.randn_like(post.mean) * post.std, atol=1e-6)  # reparameterised


@pytest.mark.parametrize("params, size, message", [
    ({**TINY, "block_out_channels": [8, 16, 16]}, 30, "not a multiple of the downsampling factor 4"),
    ({**TINY, "norm_num_groups": 3}, 28, "norm_num_groups': 3 does not divide"),
    ({**TINY, "pretrained": "/nonexistent/vae"}, 28, "cannot load an AutoencoderKL from '/nonexistent/vae'"),
    ({**TINY, "layer_per_block": 2}, 28, "model.params.layer_per_block"),
])
def test_bad_params_are_one_line_errors(params: dict, size: int, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_model(ModelConfig(name="diffusers_kl", in_channels=3, image_size=size, params=params))
    assert "\n" not in str(err.value)


def _kl_config(tmp: Path, shards: Path, name: str, **sections: dict) -> Path:
    return write_config(tmp, shards, name, data={"batch_size": 32, "normalize": True},
                        model={"name": "diffusers_kl", "in_channels": 1, "image_size": 28, "params": TINY},
                        loss={"name": "l1", "beta": 1e-4}, train={"epochs": 1, "max_steps": 6, "ema_decay": 0.9, "seed": 3, "mixed_precision": "no"},
                        **sections)


@pytest.mark.slow
def test_trained_model_round_trips_and_evaluates_with_ema(tmp_path: Path, tiny_shards: Path, train: RunFn, run_py: RunFn) -> None:
    cfg = _kl_config(tmp_path, tiny_shards, "kl", log={"wandb": "disabled", "every": 2, "probe_size": 16})
    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs/kl"
    summary = json.loads((run / "summary.json").read_text())
    for split in ("val", "test"):  # EMA weights measured beside the raw ones, and they differ
        assert {f"{split}/mse", f"{split}_ema/mse", f"{split}_ema/kl"} <= set(summary)
        assert summary[f"{split}/mse"] != summary[f"{split}_ema/mse"]
    assert (run / "figures/recon_ema_epoch000.png").is_file() and (run / "figures/prior_samples_epoch000.png").is_file()

    # A trained model leaves as a diffusers folder that diffusers itself and model.params.pretrained both read.
    ckpt = run / "checkpoints/step-6"
    model = build_model(ModelConfig(name="diffusers_kl", in_channels=1, image_size=28, params=TINY))
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    out = export_pretrained(model, tmp_path / "exported")
    cli = run_py(["launch/export.py", str(run), "--format", "diffusers", "--out", str(tmp_path / "exported_ema")])  # the EMA weights by default
    assert cli.returncode == 0, cli.stderr[-2000:]
    exported = AutoencoderKL.from_pretrained(tmp_path / "exported_ema").state_dict()
    assert max_diff({f"vae.{k}": v for k, v in exported.items()}, find_ema_state(ckpt)) == 0.0
    reloaded = build_model(ModelConfig(name="diffusers_kl", in_channels=1, image_size=28, params={"pretrained": str(out)}))
    theirs = AutoencoderKL.from_pretrained(out)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    for m in (model, reloaded, theirs):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(x).recon, reloaded(x).recon)
        assert torch.equal(model.encode(x), theirs.encode(x).latent_dist.mean)

    # evaluate.py prefers the EMA weights, leaves the checkpoint (discriminator, optimizer) as it was.
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    ev = run_py(["launch/evaluate.py", str(run), "--no-wandb"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    ema_eval = json.loads((run / "eval.json").read_text())
    assert ema_eval["weights"] == "ema" and ema_eval["test/mse"] == pytest.approx(summary["test_ema/mse"], rel=1e-5)
    raw = run_py(["launch/evaluate.py", str(run), "--no-wandb", "--weights", "raw"])
    assert raw.returncode == 0, raw.stderr[-2000:]
    raw_eval = json.loads((run / "eval.json").read_text())
    assert raw_eval["weights"] == "raw" and raw_eval["test/mse"] == pytest.approx(summary["test/mse"], rel=1e-5)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


@pytest.mark.slow
def test_ema_after_kill_9_and_resume_equals_the_uninterrupted_ema(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    def config(name: str) -> Path:
        return write_config(tmp_path, tiny_shards, name, data={"batch_size": 32}, model={"channels": [16, 32, 64], "latent_dim": 4},
                            train={"epochs": 8, "checkpoint_every": 10, "eval_every": 1000, "keep_last": 3, "ema_decay": 0.95},
                            log={"wandb": "disabled", "every": 10, "figures_every": 1000, "probe_size": 16})

    assert train(config("ref")).returncode == 0
    cfg, run = config("killed"), tmp_path / "runs/killed"
    kill_and_resume(train, cfg, run, 30)
    ref, got = find_ema_state(tmp_path / "runs/ref/checkpoints/step-64"), find_ema_state(run / "checkpoints/step-64")
    assert ref is not None and got is not None
    assert max_diff(got, ref) <= 1e-6
    raw = load_file(run / "checkpoints/step-64/model.safetensors")
    assert max_diff(got, raw) > 1e-4  # the EMA really is another set of weights
