"""Evaluate a finished run's checkpoint: metrics to eval.json, figures to figures/ and its W&B run.

    python launch/evaluate.py runs/NAME [--checkpoint best]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from aedist import metrics
from aedist.checkpoint import DamagedCheckpoint, TrainState, check_files, check_writable, named_checkpoint, newest_usable, read_matching_state
from aedist.config import Config
from aedist.data import read_manifest
from aedist.data.remote import set_cache_defaults
from aedist.errors import UserError
from aedist.evaluation import draw_figures, evaluate_split, knn_metric, load_probe
from aedist.evaluation.backbones import check_backbones
from aedist.evaluation.passes import split_limit
from aedist.evaluation.quality import check_metric_names
from aedist.loading import load_run_config
from aedist.models import build_model
from aedist.optim import find_ema_state
from aedist.runs import eval_file


def load_weights(cfg: Config, folder: Path, weights: str, device: torch.device | str) -> tuple[nn.Module, bool]:
    """The run's model in eval mode with a checkpoint's weights: its EMA weights for ``weights="auto"``
    where it has them (or ``"ema"``, which insists), else ``model.safetensors``; and whether they were EMA.
    A missing, truncated or foreign weights file is :class:`DamagedCheckpoint` (a one-line UserError)."""
    model = build_model(cfg.model).to(device)
    # The EMA lives in a custom_checkpoint_N.pkl; find_ema_state skips one that does not load, so a truncated
    # one would silently give the raw weights: check the files first.
    check_files(folder, ("model.safetensors",) + (("custom_checkpoint_*.pkl",) if weights != "raw" else ()))
    try:
        model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    except Exception as err:  # noqa: BLE001 - a missing, truncated or foreign weights file
        raise DamagedCheckpoint(folder, f"model.safetensors cannot be read ({type(err).__name__})",
                                "use another checkpoint with --checkpoint step-N") from None
    ema = find_ema_state(folder) if weights != "raw" else None
    if weights == "ema" and ema is None:
        raise UserError(f"{folder} holds no EMA weights (the run had train.ema_decay=0); use --weights raw")
    if ema is not None:
        model.load_state_dict({k: v.to(device) for k, v in ema.items()})
    return model.eval(), ema is not None


def load_checkpoint_weights(cfg: Config, run: Path, checkpoint: str | None, weights: str, device: torch.device | str,
                            warn: Callable[[str], None]) -> tuple[TrainState, nn.Module, bool, Path]:
    """State, model and EMA flag of a run's checkpoint: ``checkpoint`` (a folder name inside checkpoints/,
    damaged = one line), or else the newest usable one, falling back past damaged ones with a ``warn`` line
    each, by the same path as training's resume (:func:`aedist.checkpoint.newest_usable`)."""
    root = run / "checkpoints"
    fix = f"it does not belong to {run}/config.yaml"

    def load(folder: Path) -> tuple[TrainState, nn.Module, bool]:
        state = read_matching_state(folder, cfg.model_hash(), fix=fix)
        return (state, *load_weights(cfg, folder, weights, device))

    if checkpoint is not None:
        folder = named_checkpoint(root, checkpoint)
        try:
            return (*load(folder), folder)
        except DamagedCheckpoint as err:  # named by the user: no silent fallback to another one
            raise DamagedCheckpoint(folder, err.problem, "pass another --checkpoint, or none for the newest usable one") from None
    found = newest_usable(root, load, warn, f"train the run again (train.resume=never) or restore a checkpoint into {root}")
    if found is None:
        raise UserError(f"{run} has no complete checkpoint; train it first")
    (state, model, ema), folder = found
    return state, model, ema, folder


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str | None = None, wandb: bool = True,
                 weights: str = "auto", imports: Sequence[str] = (), extra_metrics: Sequence[str] = (), figures: bool = True,
                 limit: int = 0) -> Path:
    """Metrics and figures of a run's checkpoint; returns the path of the eval.json it wrote.

    ``weights``: ``auto`` = the EMA weights where the checkpoint has them (what a trained KL autoencoder
    ships), else the raw ones; ``ema`` insists on them; ``raw`` = the optimizer's weights. The
    checkpoint is only read: a discriminator or optimizer state in it stays as it is. The extensions the
    run's config.yaml records are imported again, and ``imports`` (``--import``) besides. ``extra_metrics``
    (``--metrics``) are measured besides the run's ``eval.metrics``, e.g. on a run trained without them.
    ``figures=False`` (``--no-figures``) skips the figures (the train split never draws any). ``limit``
    (``--limit``) scores the split's first N images in manifest order, e.g. a 10,000-image sample of a
    54,000-image train split for a generalization gap; the eval file records it."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass runs/NAME as made by launch/train.py")
    cfg = load_run_config(run, imports)
    set_cache_defaults(cfg.data.cache_dir, cfg.data.cache_max_gb)
    cfg.run.dir, cfg.run.name = str(run.parent), run.name
    if extra_metrics:
        check_metric_names(extra_metrics, key="--metrics")
        cfg.eval.metrics = [*dict.fromkeys([*cfg.eval.metrics, *extra_metrics])]
    # A read-only run folder, a damaged checkpoint or a bad --checkpoint: told before minutes of evaluation.
    check_writable(run, f"evaluate a writable copy (cp -r {run} /tmp/{run.name}) or remount it read-write (eval.json and figures go there)")
    state, model, ema, folder = load_checkpoint_weights(cfg, run, checkpoint, weights, "cpu", print)  # moved to acc.device below
    check_backbones(cfg.eval.metrics, cfg.eval.lpips_net, tuple(read_manifest(cfg.data.shards).shape[-2:]))  # offline: no weights, no start
    if not wandb:
        cfg.log.wandb = "disabled"
    from aedist.tracking import Tracker, trackers_for

    acc = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available(), log_with=trackers_for(cfg) or None,
                      project_dir=str(run))
    model.to(acc.device)

    # The train split in eval mode (no dropout, batch-norm running stats) is keyed train_eval/, apart from
    # the training-time train/ loss: a generalization gap compares it with val/ of the same checkpoint.
    name = "train_eval" if split == "train" else split
    # the limit cuts the scored split only, not the train images the kNN below is fitted on
    values, latents = evaluate_split(model, cfg, acc, split, prefix=name, limit=limit)
    classes = read_manifest(cfg.data.shards).classes
    if split != "train":  # the kNN is fitted on train latents: scoring it on them says nothing
        values.update(knn_metric(model, cfg, acc, latents, split=split, class_names=classes))
    z = torch.from_numpy(latents[0]["clean"])
    values.update({f"{name}/latent_{k}": v for k, v in metrics.latent_gaussianity(z).items()})
    values.update({"checkpoint_step": state.step, "epoch": state.epoch, "weights": "ema" if ema else "raw"})
    if scored := split_limit(cfg, limit):
        values["limit"] = scored
    out = run / eval_file(checkpoint, split)  # eval.json, eval_best.json, eval_train.json, eval_best_train.json ...
    out.write_text(json.dumps(values, indent=2))

    tracker = Tracker(acc, cfg, state.wandb_run_id, job_type="evaluate")  # the training run's W&B id: same run, resumed (job_type: issue 27)
    figs = {} if split == "train" or not figures else draw_figures(model, cfg, load_probe(cfg, acc.device), latents, classes, full=True)
    # W&B drops history rows whose step is below the run's last one, so evaluation logs one step later.
    numbers = {f"eval/{k}": v for k, v in values.items() if not isinstance(v, str)}  # "weights": "ema" stays in eval.json
    tracker.log(numbers, step=state.step + 1, epoch=state.epoch)
    tracker.log_images({k.replace("figures/", "eval/"): v for k, v in figs.items()}, step=state.step + 1, epoch=state.epoch)
    tracker.close()
    return out
