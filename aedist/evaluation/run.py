"""Evaluate a finished run's checkpoint: metrics to eval.json, figures to figures/ and its W&B run.

    python launch/evaluate.py runs/NAME [--checkpoint best]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from aedist import metrics
from aedist.checkpoint import newest_checkpoint, read_matching_state
from aedist.config import Config, config_from_dict, read_yaml
from aedist.data import read_manifest
from aedist.data.remote import set_cache_defaults
from aedist.errors import UserError
from aedist.evaluation import draw_figures, evaluate_split, knn_metric, load_probe
from aedist.evaluation.backbones import check_backbones
from aedist.models import build_model
from aedist.optim import find_ema_state


def load_weights(cfg: Config, folder: Path, weights: str, device: torch.device | str) -> tuple[nn.Module, bool]:
    """The run's model in eval mode with a checkpoint's weights: its EMA weights for ``weights="auto"``
    where it has them (or ``"ema"``, which insists), else ``model.safetensors``; and whether they were EMA."""
    model = build_model(cfg.model).to(device)
    try:
        model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    except Exception as err:  # noqa: BLE001 - a missing, truncated or foreign weights file
        raise UserError(f"{folder}/model.safetensors cannot be read ({type(err).__name__}); "
                        "use another checkpoint with --checkpoint step-N") from None
    ema = find_ema_state(folder) if weights != "raw" else None
    if weights == "ema" and ema is None:
        raise UserError(f"{folder} holds no EMA weights (the run had train.ema_decay=0); use --weights raw")
    if ema is not None:
        model.load_state_dict({k: v.to(device) for k, v in ema.items()})
    return model.eval(), ema is not None


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str | None = None, wandb: bool = True,
                 weights: str = "auto") -> Path:
    """Metrics and figures of a run's checkpoint; returns the path of the eval.json it wrote.

    ``weights``: ``auto`` = the EMA weights where the checkpoint has them (what a trained KL autoencoder
    ships), else the raw ones; ``ema`` insists on them; ``raw`` = the optimizer's weights. The
    checkpoint is only read: a discriminator or optimizer state in it stays as it is."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass runs/NAME as made by launch/train.py")
    cfg = config_from_dict(read_yaml(run / "config.yaml", "run config"))
    set_cache_defaults(cfg.data.cache_dir, cfg.data.cache_max_gb)
    cfg.run.dir, cfg.run.name = str(run.parent), run.name
    folder = run / "checkpoints" / checkpoint if checkpoint else newest_checkpoint(run / "checkpoints")
    if folder is None or not (folder / "COMPLETE").exists():
        raise UserError(f"{run} has no complete checkpoint{' ' + checkpoint if checkpoint else ''}; train it first")
    state = read_matching_state(folder, cfg.model_hash(), fix=f"it does not belong to {run}/config.yaml")
    check_backbones(cfg.eval.metrics, cfg.eval.lpips_net, tuple(read_manifest(cfg.data.shards).shape[-2:]))  # offline: no weights, no start
    if not wandb:
        cfg.log.wandb = "disabled"
    from aedist.tracking import Tracker, trackers_for

    acc = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available(), log_with=trackers_for(cfg) or None,
                      project_dir=str(run))
    model, ema = load_weights(cfg, folder, weights, acc.device)

    values, latents = evaluate_split(model, cfg, acc, split)
    values.update(knn_metric(model, cfg, acc, latents))
    z = torch.from_numpy(latents[0]["clean"])
    values.update({f"{split}/latent_{k}": v for k, v in metrics.latent_gaussianity(z).items()})
    values.update({"checkpoint_step": state.step, "epoch": state.epoch, "weights": "ema" if ema else "raw"})
    out = run / (f"eval_{checkpoint}.json" if checkpoint else "eval.json")  # e.g. eval_best.json beside eval.json
    out.write_text(json.dumps(values, indent=2))

    tracker = Tracker(acc, cfg, state.wandb_run_id)  # the training run's W&B id: same run, resumed
    figs = draw_figures(model, cfg, load_probe(cfg, acc.device), latents, read_manifest(cfg.data.shards).classes, full=True)
    # W&B drops history rows whose step is below the run's last one, so evaluation logs one step later.
    numbers = {f"eval/{k}": v for k, v in values.items() if not isinstance(v, str)}  # "weights": "ema" stays in eval.json
    tracker.log(numbers, step=state.step + 1, epoch=state.epoch)
    tracker.log_images({k.replace("figures/", "eval/"): v for k, v in figs.items()}, step=state.step + 1, epoch=state.epoch)
    tracker.close()
    return out
