"""The perceptual + adversarial objective (lpips_gan) through the same engine: the adaptive weight,
disc_start, DDP exactness with two networks, kill -9 / elastic resume of model, discriminator and EMA,
and the NaN guard on the discriminator's loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_elastic import _consumed, _launch
from test_engine import RunFn, kill_and_resume, max_diff, write_config
from torch import nn

from aedist.config import load_config
from aedist.errors import UserError
from aedist.evaluation import backbones
from aedist.objectives import build_objective, last_layer
from aedist.objectives.lpips_gan import adaptive_weight, discriminator_loss, generator_loss
from aedist.optim import find_ema_state

GAN = {"name": "lpips_gan", "params": {"perceptual_weight": 0.0, "disc_start": 3, "disc_layers": 2, "disc_ndf": 8, "disc_norm": "group"}}


def test_adaptive_weight_is_the_hand_computed_gradient_norm_ratio() -> None:
    # A one-layer decoder y = W x, an L2 reconstruction and a linear critic a·y: both gradients in closed form.
    rng = np.random.default_rng(0)
    x, t, a = rng.normal(size=(5, 3)), rng.normal(size=(5, 4)), rng.normal(size=4)
    w = torch.tensor(rng.normal(size=(4, 3)), requires_grad=True)
    y = torch.from_numpy(x) @ w.T
    nll = ((y - torch.from_numpy(t)) ** 2).mean()
    gen = -(y @ torch.from_numpy(a)).mean()
    W = w.detach().numpy()
    g_nll = 2.0 / (5 * 4) * (x @ W.T - t).T @ x  # d mean((Wx - t)^2) / dW
    g_gen = -np.outer(a, x.sum(0)) / 5  # d -mean(a·Wx) / dW
    expected = np.linalg.norm(g_nll) / (np.linalg.norm(g_gen) + 1e-4)
    assert float(adaptive_weight(nll, gen, w)) == pytest.approx(expected, rel=1e-6)
    assert float(adaptive_weight(nll, gen * 1e-12, w, clamp=50.0)) == 50.0  # clamped
    assert not adaptive_weight(nll, gen, w).requires_grad  # detached: λ is a weight, not a path for gradients


def test_gan_losses_match_their_definitions() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.2, 1.5])
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real.numpy())) + np.mean(np.maximum(0, 1 + fake.numpy())))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real.numpy()))) + np.mean(np.log1p(np.exp(fake.numpy()))))
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(hinge)
    assert float(discriminator_loss(real, fake, "vanilla")) == pytest.approx(vanilla)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(-fake.mean().item())
    assert float(generator_loss(fake, "non_saturating")) == pytest.approx(np.mean(np.log1p(np.exp(-fake.numpy()))))


def test_last_layer_is_the_decoders_output_conv() -> None:
    cfg = load_config("configs/debug.yaml")
    from aedist.models import build_model

    model = build_model(cfg.model)
    convs = [m for m in model.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert last_layer(model) is convs[-1].weight


def test_missing_lpips_weights_offline_are_refused_before_step_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = load_config("configs/debug.yaml", ["objective.name=lpips_gan", "objective.params={perceptual_weight: 1.0}"])
    with pytest.raises(UserError, match=r"needs the pretrained weights vgg16-397923af\.pth, not found in .*empty/hub/checkpoints") as err:
        build_objective(cfg)
    assert "\n" not in str(err.value) and "fetch_weights.py" in str(err.value)


@pytest.mark.parametrize("override", ["objective.params={perceptual_weight: 1.0, lpips_net: vgg}", "eval.metrics=[mse, lpips]"])
def test_train_without_lpips_weights_exits_2_in_one_line(tmp_path: Path, tiny_shards: Path, train: RunFn, override: str) -> None:
    cfg = _gan_config(tmp_path, tiny_shards, "offline")
    proc = train(cfg, override, env={"TORCH_HOME": str(tmp_path / "empty")})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "hub/checkpoints" in proc.stderr and "fetch_weights.py" in proc.stderr
    assert not (tmp_path / "runs/offline/checkpoints").exists()  # refused before step 1


def test_unknown_objective_param_names_the_key() -> None:
    from aedist.loading import load_config  # names are checked there (aedist.config: the schema alone)

    with pytest.raises(UserError, match="objective.params.disc_strat"):
        load_config("configs/debug.yaml", ["objective.name=lpips_gan", "objective.params={disc_strat: 5}"])


def test_perceptual_term_runs_through_the_lpips_backbone_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in backbone through the shipped path (BACKBONES): the term is LPIPS(x̂, x) on [-1, 1] RGB,
    # and the model gets its gradient.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Distance(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            seen.append((a, b))
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(backbones.BACKBONES, "lpips", lambda variant: Distance())
    cfg = load_config("configs/debug.yaml", ["objective.name=lpips_gan", "objective.params={perceptual_weight: 2.0, disc_start: 100}",
                                             "loss.name=l1"])
    objective = build_objective(cfg)
    from aedist.batch import prepare_batch
    from aedist.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = prepare_batch(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), [], None)
    grads: list[str] = []
    terms = objective.micro_step(model, model, batch, step=0, networks={}, backward=lambda loss, name: (grads.append(name), loss.backward()))
    a, b = seen[0]
    assert a.shape == (4, 3, 28, 28) and float(b.min()) >= -1.0 and float(b.max()) <= 1.0 and float(b.min()) < -0.5  # [0,1] -> [-1,1]
    assert float(terms["perceptual"]) == pytest.approx(float((a - b).abs().mean().detach()))
    assert float(terms["loss"]) == pytest.approx(float((terms["recon"] + 2.0 * terms["perceptual"]).detach()))
    assert grads == ["loss"] and "disc_loss" not in terms  # before disc_start: no adversarial term, no discriminator step
    assert last_layer(model).grad is not None


# ---------------------------------------------------------------- through launch/train.py


def _gan_config(tmp: Path, shards: Path, name: str, **sections: dict) -> Path:
    base = {"objective": GAN, "loss": {"name": "l1"}, "train": {"epochs": 2, "seed": 3, "ema_decay": 0.9, "checkpoint_every": 1, "keep_last": 20,
                                                               "mixed_precision": "no"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_config(tmp, shards, name, **base)


def _ckpt(run: Path, step: int, file: str) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step-{step}" / file)


@pytest.mark.slow
def test_discriminator_waits_for_disc_start_then_trains(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    proc = train(_gan_config(tmp_path, tiny_shards, "gan"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs/gan"
    disc = [_ckpt(run, s, "model_1.safetensors") for s in range(1, 9)]
    for s in (1, 2):  # steps 1-3 (indices 0-2) come before disc_start=3: the discriminator is untouched
        assert max_diff(disc[s], disc[0]) == 0.0
    assert max_diff(disc[3], disc[2]) > 1e-5 and max_diff(disc[7], disc[3]) > 1e-5
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}
    for s in (1, 2, 3):
        assert "train/disc_loss" not in rows[s] and rows[s]["train/loss"] == pytest.approx(rows[s]["train/recon"])
    for s in (4, 8):  # loss = recon + disc_weight · λ · G, and every term and the logits are logged
        r = rows[s]
        assert {"train/gen", "train/adaptive_weight", "train/disc_loss", "train/logits_real", "train/logits_fake"} <= set(r)
        assert r["train/loss"] == pytest.approx(r["train/recon"] + 0.5 * r["train/adaptive_weight"] * r["train/gen"], rel=1e-5)
    assert "kl" not in "".join(rows[8])  # a deterministic AE: no KL term


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    # The whole train split (256) as one batch, the discriminator on from the first step: 1 and 2 ranks
    # see the same samples; λ comes from the rank-averaged gradients. SGD for both networks: Adam's first
    # step, lr·g/(|g| + 1e-8), would turn the CPU convolutions' own rounding (~1e-4 relative in the
    # PatchGAN's weight gradients, even between thread counts of one process) into lr-sized differences.
    common = {"data": {"batch_size": 256}, "optim": {"name": "sgd", "lr": 0.5}, "train": {"max_steps": 2, "epochs": 2},
              "objective": {**GAN, "params": {**GAN["params"], "disc_start": 0, "disc_lr": 0.01}}}
    one, two = _gan_config(tmp_path, tiny_shards, "one", **common), _gan_config(tmp_path, tiny_shards, "two", **common)
    p1, p2 = train(one), train(two, procs=2)
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert p2.returncode == 0, p2.stderr[-2000:]
    r1, r2 = tmp_path / "runs/one", tmp_path / "runs/two"
    assert max_diff(_ckpt(r1, 2, "model_1.safetensors"), _ckpt(r1, 1, "model_1.safetensors")) > 1e-4  # it trained
    for f in ("model.safetensors", "model_1.safetensors"):
        assert max_diff(_ckpt(r1, 2, f), _ckpt(r2, 2, f)) <= 1e-6, f
    assert max_diff(find_ema_state(r1 / "checkpoints/step-2"), find_ema_state(r2 / "checkpoints/step-2")) <= 1e-6


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_model_disc_and_ema(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    def config(name: str) -> Path:
        return _gan_config(tmp_path, tiny_shards, name, data={"batch_size": 32}, train={"epochs": 6, "checkpoint_every": 8, "eval_every": 1000},
                           objective={**GAN, "params": {**GAN["params"], "disc_start": 10}},
                           log={"wandb": "disabled", "every": 8, "figures_every": 1000, "probe_size": 16})

    assert train(config("ref")).returncode == 0
    cfg, run = config("killed"), tmp_path / "runs/killed"
    kill_and_resume(train, cfg, run, 24)
    ref = tmp_path / "runs/ref"
    for f in ("model.safetensors", "model_1.safetensors"):
        assert max_diff(_ckpt(run, 48, f), _ckpt(ref, 48, f)) <= 1e-6, f
    assert max_diff(find_ema_state(run / "checkpoints/step-48"), find_ema_state(ref / "checkpoints/step-48")) <= 1e-6


@pytest.mark.slow
def test_elastic_2_to_1_keeps_sample_accounting_and_both_networks_state(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    cfg = _gan_config(tmp_path, tiny_shards, "elastic", data={"batch_size": 48, "shuffle_buffer": 64},
                      train={"epochs": 2, "checkpoint_every": 2}, log={"wandb": "disabled", "every": 1, "figures_every": 1000, "probe_size": 16})
    dump = tmp_path / "ids"
    dump.mkdir()
    first = _launch(run_py, cfg, 2, "train.max_steps=2", dump=dump)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _launch(run_py, cfg, 1, "train.max_steps=0", dump=dump)
    assert second.returncode == 0, second.stderr[-2000:]
    epoch0 = _consumed(dump, 0)
    assert len(np.unique(epoch0)) == len(epoch0) and 0 <= 256 - len(epoch0) < 256 % 48 + 48  # as the plain model's elastic test
    run = tmp_path / "runs/elastic"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_sizes"] == [2, 1]
    last = f"checkpoints/step-{summary['step']}"
    # Restored, not restarted: the EMA counts every step of both starts, the discriminator's Adam every step from disc_start.
    ema = torch.load(sorted((run / last).glob("custom_checkpoint_*.pkl"))[-1], weights_only=True)
    assert int(ema["n_averaged"]) == summary["step"]
    disc_opt = torch.load(run / last / "optimizer_1.bin", weights_only=True)
    assert {int(s["step"]) for s in disc_opt["state"].values()} == {summary["step"] - 3}


@pytest.mark.slow
def test_nan_in_the_discriminator_loss_on_one_rank_skips_the_step_on_all(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = _gan_config(tmp_path, tiny_shards, "nan", train={"epochs": 2, "max_bad_steps": 1})
    proc = train(cfg, procs=2, env={"AEDIST_INJECT_NAN": "1:5:disc_loss"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss at step 5" in proc.stdout + proc.stderr
    run = tmp_path / "runs/nan"
    for f in ("model.safetensors", "model_1.safetensors"):  # step 5 applied nothing, on either rank's copy
        assert max_diff(_ckpt(run, 5, f), _ckpt(run, 4, f)) == 0.0, f
        assert max_diff(_ckpt(run, 6, f), _ckpt(run, 5, f)) > 0.0, f  # and training went on
    a, b = find_ema_state(run / "checkpoints/step-4"), find_ema_state(run / "checkpoints/step-5")
    assert max_diff(a, b) == 0.0  # no EMA update for a skipped step
