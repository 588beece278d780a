"""In-process unit tests of the engine's parts: registries, the schedule, checkpoint rotation and
policy, the one batch path, and a two-step Trainer on a CPU Accelerator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from aedist.batch import prepare_batch, to_model, to_pixels
from aedist.checkpoint import CheckpointPolicy, TrainState, list_checkpoints
from aedist.config import OptimConfig, load_config
from aedist.data.corruption import CORRUPTIONS, make_generator, rot90
from aedist.errors import UserError
from aedist.evaluation import FIGURES
from aedist.losses import LOSSES
from aedist.metrics import METRICS
from aedist.models import MODELS
from aedist.optim import Schedule
from aedist.registry import Registry


def test_registry_rejects_duplicates_and_names_what_exists() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    with pytest.raises(ValueError, match="widget 'alpha' is registered twice"):
        reg.register("alpha")(2)
    with pytest.raises(UserError) as err:
        reg.get("alpah", key="x.name")
    assert str(err.value) == "config key 'x.name': unknown widget 'alpah'; did you mean 'alpha'? (known: alpha)"


@pytest.mark.parametrize("registry, expected", [
    (MODELS, {"conv_ae", "conv_vae", "mlp_ae", "mlp_vae", "diffusers_kl"}), (LOSSES, {"mse", "l1", "bce"}),
    (CORRUPTIONS, {"rotate", "rot90", "jigsaw", "gaussian_noise", "copies"}),
    (FIGURES, {"recon", "recon_error", "recon_ema", "samples", "latent", "interpolation", "rotation_panel", "prior_samples"}),
    (METRICS, {"mse", "psnr_db", "snr_db"}),
])
def test_each_extension_point_registers_its_entries(registry: Registry, expected: set[str]) -> None:
    assert set(registry) == expected


def test_unknown_loss_is_a_config_error_not_a_silent_mse() -> None:
    from aedist.loading import load_config  # names are checked there (aedist.config: the schema alone)

    with pytest.raises(UserError, match="config key 'loss.name': unknown loss 'l2'"):
        load_config("configs/debug.yaml", ["loss.name=l2"])


def test_corruption_that_does_not_fit_the_images_is_refused_before_training() -> None:
    from aedist.data.corruption import validate_spec

    with pytest.raises(ValueError, match="grid 5 must divide the image size 28x28"):
        validate_spec([{"jigsaw": {"grid": 5}}], (1, 28, 28))
    assert validate_spec([{"jigsaw": {"grid": 7}}], (1, 28, 28)) == [{"jigsaw": {"grid": 7}}]


def test_one_batch_path_scales_corrupts_and_normalizes() -> None:
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    gen = make_generator(0, 0, 3, "cpu")
    batch = prepare_batch(images, [{"rot90": {}}], gen, normalize=True)
    x = images.float() / 255
    k = batch.params["rot90"]["k"]
    assert torch.equal(batch.pixel_inputs, rot90(x, k))  # the draws replay through the public op
    assert torch.equal(batch.targets, (x - 0.5) / 0.5) and torch.equal(batch.pixel_targets, x)
    assert torch.allclose(to_pixels(to_model(x, True), True), x)
    grown = prepare_batch(images, [{"copies": {"n": 2}}], gen)
    assert grown.inputs.shape[0] == 12 and torch.equal(grown.targets, x.repeat(3, 1, 1, 1))


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_cosine_schedule_steps_per_step_with_warmup() -> None:
    opt = _sgd()
    sched = Schedule(opt, OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.after_step()
        sched.after_epoch(1.0)  # no effect on cosine
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])


@pytest.mark.parametrize("plateau_on", ["train", "val"])
def test_plateau_watches_only_the_loss_it_is_told(plateau_on: str) -> None:
    opt = _sgd()
    sched = Schedule(opt, OptimConfig(scheduler="plateau", plateau_on=plateau_on, plateau_factor=0.5, plateau_patience=0), 100)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(_sgd(), factor=0.5, patience=0)
    for loss in [1.0, 1.0, 0.5, 0.6]:
        sched.after_epoch(loss)  # train loss
        sched.after_eval(loss)  # val loss: same numbers, only one of the two hooks may act
        reference.step(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(reference.optimizer.param_groups[0]["lr"]) == 0.25
    assert sched.state_dict()["num_bad_epochs"] == reference.state_dict()["num_bad_epochs"]


def test_checkpoint_policy_rotates_keeps_best_and_never_saves_a_step_twice(tmp_path: Path) -> None:
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    folds = []
    policy = CheckpointPolicy(acc, tmp_path, every=2, keep_last=2, before_save=lambda: folds.append(1))
    state = TrainState()
    for step in range(1, 8):
        state.step = step
        policy.after_step(state, preempted=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-6"]  # keep_last=2 of 2, 4, 6
    assert policy.after_eval(state, 0.5) and not policy.after_eval(state, 0.7)
    assert json.loads((tmp_path / "best" / "state.json").read_text())["best_val"] == 0.5
    assert state.epochs_since_best == 1
    policy.finish(state)  # step 7 was not saved yet
    n = len(folds)
    policy.finish(state)  # ...and is not saved twice
    assert len(folds) == n and [p.name for p in list_checkpoints(tmp_path)] == ["step-6", "step-7"]
    assert not list(tmp_path.glob(".tmp-*")) and model is not None


def test_two_step_trainer_in_process(tmp_path: Path, tiny_shards: Path) -> None:
    from aedist.engine import Trainer

    cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=two", "data.batch_size=32",
                             "train.max_steps=2", "train.epochs=1", "log.wandb=disabled", "train.mixed_precision=no",
                             "log.every=1", "train.cpu=true", "train.compile=false"])
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.fit() == 0
    assert trainer.state.step == 2 and trainer.mixed_precision == "no" and not trainer.compiled
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["step"] == 2 and math.isfinite(summary["test/mse"])
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
