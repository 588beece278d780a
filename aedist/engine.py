"""The training loop: the only module that holds the Accelerator.

    accelerate launch launch/train.py --config configs/seeds/fashion_rotated.yaml train.epochs=3
    python launch/train.py --config configs/debug.yaml            # one process, CPU or one GPU

One optimizer step = ``train.grad_accum`` micro-batches of ``data.batch_size / (ranks * accum)``
images per rank. At every step boundary the ranks agree, in one all-reduce, on two flags: a
preemption signal arrived (SIGUSR1/SIGTERM) and a loss was not finite. Preemption saves a
checkpoint on every rank at the same step and exits with :data:`REQUEUE_EXIT_CODE`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from aedist.benchmarks import vm_hwm_mb
from aedist.checkpoint import TrainState, find_resume, load_checkpoint, save_checkpoint
from aedist.config import Config, save_config
from aedist.data import corrupt, load_batches, num_batches, read_manifest
from aedist.data.corruption import make_generator
from aedist.errors import UserError
from aedist.evaluation import draw_figures, evaluate_split, knn_metric, load_probe, to_model
from aedist.losses import compute_loss
from aedist.models import build_model
from aedist.optim import build_optimizer, build_scheduler
from aedist.tracking import Tracker, new_run_id, trackers_for

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, run me again" (slurm/ requeues on it)
# Fault injection for tests and drills: AEDIST_INJECT_NAN="RANK:STEP" makes that rank's loss NaN at that step.
INJECT_NAN = os.environ.get("AEDIST_INJECT_NAN", "")


class Diverged(RuntimeError):
    """The loss stayed non-finite for more than ``train.max_bad_steps`` steps."""


class _StopFlag:
    """Signal handlers only set this flag; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.raised = True


class Trainer:
    """Builds everything from a config, resumes if asked, and runs :meth:`fit`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        use_cpu = t.cpu or not torch.cuda.is_available()
        self.accelerator = acc = Accelerator(
            cpu=use_cpu, mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with=trackers_for(cfg) or None, project_dir=str(cfg.run_dir),
        )
        self.world, self.rank = acc.num_processes, acc.process_index
        self.manifest = read_manifest(cfg.data.shards)
        self._check_shapes()
        set_seed(t.seed)  # identical initial weights on every rank, whatever DDP's broadcast does
        model = build_model(cfg.model)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, cfg.optim, on_cuda=acc.device.type == "cuda")
        self.model, self.optimizer = acc.prepare(torch.compile(model) if t.compile else model, self.optimizer)
        self.per_rank = cfg.data.batch_size // (self.world * t.grad_accum)
        self.steps_per_epoch = num_batches(cfg.data.shards, "train", self.per_rank, self.world, limit=cfg.data.limit) // t.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the train split of {cfg.data.shards}; lower it")
        self.total_steps = t.epochs * self.steps_per_epoch if t.max_steps == 0 else min(t.max_steps, t.epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer.optimizer, cfg.optim, self.total_steps)
        if self.scheduler is not None:
            acc.register_for_checkpointing(self.scheduler)
        self.ckpt_root = cfg.run_dir / "checkpoints"
        self.state = self._resume_or_start()
        if acc.is_main_process:
            save_config(cfg, cfg.run_dir / "config.yaml")
            launcher = ["python"] if self.world == 1 else ["accelerate", "launch", "--num_processes", str(self.world)]
            with open(cfg.run_dir / "command.txt", "a") as fh:  # every (re)start, as typed, for the report
                fh.write(shlex.join(launcher + sys.argv) + "\n")
        self.tracker = Tracker(acc, cfg, self.state.wandb_run_id)
        self.stop = _StopFlag()
        self.has_val = "val" in self.manifest.splits
        if t.early_stop_patience and not self.has_val:
            raise UserError(f"train.early_stop_patience needs a val split, and {cfg.data.shards} has none; "
                            "pack with --val-fraction > 0 or set train.early_stop_patience=0")
        if cfg.optim.scheduler == "plateau" and cfg.optim.plateau_on == "val" and not self.has_val:
            raise UserError(f"optim.plateau_on=val needs a val split, and {cfg.data.shards} has none; "
                            "set optim.plateau_on=train or pack with --val-fraction > 0")
        # This rank's sum of step losses since the last fold into state.epoch_loss_sum (kept on the
        # device so the hot loop never syncs; folded across ranks at checkpoints and epoch ends).
        self.epoch_loss = torch.zeros((), device=acc.device)
        self.evaluated_at = -1
        self.final_metrics: dict[str, float] = {}

    def _check_shapes(self) -> None:
        m, c = self.manifest, self.cfg
        want = (c.model.in_channels, c.model.image_size, c.model.image_size)
        if tuple(m.shape) != want:
            raise UserError(f"shards {c.data.shards} hold images {tuple(m.shape)} but the model expects {want}; "
                            f"set model.in_channels/model.image_size or pick other shards")
        per = self.world * c.train.grad_accum
        if c.data.batch_size % per:
            raise UserError(f"data.batch_size={c.data.batch_size} does not divide over {self.world} ranks x "
                            f"{c.train.grad_accum} accumulation steps; use a multiple of {per}")

    def _resume_or_start(self) -> TrainState:
        folder = find_resume(self.ckpt_root, self.cfg.train.resume)
        model_hash = self.cfg.model_hash()
        if folder is None:
            return TrainState(wandb_run_id=new_run_id(), model_hash=model_hash, model=asdict(self.cfg.model))
        state = load_checkpoint(self.accelerator, folder, model_hash)
        state.resumed_from.append(state.step)
        self.accelerator.print(f"resumed from {folder} (step {state.step}, epoch {state.epoch}, batch {state.batch})")
        return state

    # ------------------------------------------------------------------ one step

    def _agree(self, *flags: bool) -> list[bool]:
        """All ranks learn whether any rank raised each flag (one tiny all-reduce)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.accelerator.device)
        return [bool(v > 0) for v in self.accelerator.reduce(t, "sum").tolist()]

    def _step(self, batches, want_norm: bool) -> tuple[dict[str, torch.Tensor], float, bool, bool]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (terms, data wait s, stop, bad).
        The grad norm is computed only when clipping or logging needs it (it walks every parameter)."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        sums: dict[str, torch.Tensor] = {}
        wait = 0.0
        for micro in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            images, _ = next(batches)
            wait += time.perf_counter() - t0
            with acc.accumulate(self.model):
                x = images.float() / 255.0
                inputs, targets = x, x
                if cfg.corruption:  # a clean run skips building a generator every step
                    gen = make_generator(cfg.train.seed, self.rank, s.step * cfg.train.grad_accum + micro, x.device)
                    inputs, targets, _ = corrupt(x, cfg.corruption, gen)
                inputs = to_model(inputs, cfg)
                if cfg.train.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                terms = compute_loss(self.model(inputs), to_model(targets, cfg), cfg.loss)
                if INJECT_NAN == f"{self.rank}:{s.step + 1}":
                    terms["loss"] = terms["loss"] * float("nan")
                acc.backward(terms["loss"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / cfg.train.grad_accum
            s.batch += 1
        stop, bad = self._agree(self.stop.raised, not bool(torch.isfinite(sums["loss"])))
        out = {f"train/{k}": v for k, v in sums.items()}
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return out, wait, stop, bad
        self.epoch_loss += sums["loss"].float()
        s.epoch_loss_steps += 1
        if cfg.optim.grad_clip or want_norm:
            out["train/grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf)
        self.optimizer.step()
        if cfg.optim.scheduler == "cosine":
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out, wait, stop, bad

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to the end (exit code 0) or until preempted (exit code :data:`REQUEUE_EXIT_CODE`)."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        micro_per_epoch = self.steps_per_epoch * cfg.train.grad_accum
        global_batch = self.per_rank * self.world * cfg.train.grad_accum
        probe = load_probe(cfg, acc.device) if acc.is_main_process else None
        bar = tqdm(total=self.total_steps, initial=s.step, disable=not acc.is_main_process, dynamic_ncols=True)
        window = {"t": time.perf_counter(), "images": 0, "wait": 0.0}
        last_saved = -1
        while s.epoch < cfg.train.epochs and s.step < self.total_steps:
            batches = load_batches(
                cfg.data.shards, "train", self.per_rank, self.rank, self.world, seed=cfg.train.seed, epoch=s.epoch,
                device=acc.device, start_batch=s.batch, limit=cfg.data.limit, on_error=cfg.data.on_error,
                shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=cfg.data.pin_memory)
            while s.batch < micro_per_epoch and s.step < self.total_steps:
                t0 = time.perf_counter()
                log_now = (s.step + 1) % cfg.log.every == 0 or s.step + 1 == self.total_steps
                terms, wait, stop, bad = self._step(batches, want_norm=log_now)
                s.step += 1
                s.images_seen += global_batch
                s.train_seconds += time.perf_counter() - t0
                window["images"] += global_batch
                window["wait"] += wait
                if bad:
                    s.bad_steps += 1
                    acc.print(f"warning: non-finite loss at step {s.step} ({s.bad_steps} of {cfg.train.max_bad_steps} allowed)")
                    if s.bad_steps > cfg.train.max_bad_steps:
                        raise Diverged(f"loss is not finite at step {s.step}; the last good checkpoint is kept in {self.ckpt_root}")
                if log_now:
                    self._log_step(terms, window, bar)
                bar.update(1)
                if stop or (cfg.train.checkpoint_every and s.step % cfg.train.checkpoint_every == 0):
                    self._save(f"step-{s.step}")
                    last_saved = s.step
                if stop:
                    acc.print(f"preempted: saved step {s.step}; exiting with {REQUEUE_EXIT_CODE} to be requeued")
                    bar.close()
                    self.tracker.close()
                    return REQUEUE_EXIT_CODE
            if s.batch >= micro_per_epoch:  # a full epoch, not a max_steps cut
                s.epoch, s.batch = s.epoch + 1, 0
                last = s.epoch >= cfg.train.epochs or s.step >= self.total_steps
                self._end_train_epoch()
                if s.epoch % cfg.train.eval_every == 0 or last:
                    if self._end_of_epoch(probe, last):
                        break
                if not cfg.train.checkpoint_every and not last:
                    self._save(f"step-{s.step}")
                    last_saved = s.step
        bar.close()
        if self.evaluated_at != s.step:  # max_steps ended mid-epoch: the final numbers still get measured
            self._end_of_epoch(probe, last=True)
        if last_saved != s.step:
            self._save(f"step-{s.step}")
        self._write_summary()
        self.tracker.close()
        return 0

    def _log_step(self, terms: dict[str, torch.Tensor], window: dict[str, float], bar: tqdm) -> None:
        acc, s = self.accelerator, self.state
        keys = sorted(terms)
        mean = acc.reduce(torch.stack([terms[k].float() for k in keys]).to(acc.device), "mean").tolist()
        elapsed = time.perf_counter() - window["t"]
        values = dict(zip(keys, mean))
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        values["train/img_per_s"] = window["images"] / max(elapsed, 1e-9)
        values["train/data_wait_s"] = window["wait"]
        if acc.device.type == "cuda":
            values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.tracker.log(values, step=s.step, epoch=s.epoch)
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", lr=f"{values['train/lr']:.2g}", img_s=f"{values['train/img_per_s']:.0f}")
        window.update(t=time.perf_counter(), images=0, wait=0.0)

    def _end_of_epoch(self, probe, last: bool) -> bool:
        """Validate, test, draw figures, step the plateau schedule, keep the best; True = stop early."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        self.evaluated_at = s.step
        model = acc.unwrap_model(self.model)  # no DDP collectives inside: ranks hold different batch counts
        values, _ = evaluate_split(model, cfg, acc, "val") if "val" in self.manifest.splits else ({}, None)
        test_values, test_latents = evaluate_split(model, cfg, acc, "test")
        values.update(test_values)
        values.update(knn_metric(model, cfg, acc, test_latents))
        val_loss = values.get("val/loss")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and cfg.optim.plateau_on == "val":
            self.scheduler.step(val_loss)
        values["epoch"] = s.epoch
        self.tracker.log(values, step=s.step, epoch=s.epoch)
        if acc.is_main_process and (s.epoch % cfg.log.figures_every == 0 or last or s.epoch == 1):
            figs = draw_figures(model, cfg, probe, test_latents, self.manifest.classes, full=last)
            self.tracker.log_images(figs, step=s.step, epoch=s.epoch)
        acc.wait_for_everyone()
        if val_loss is None:  # no val split: no model selection (the test set never picks a checkpoint)
            pass
        elif val_loss < s.best_val:
            s.best_val, s.best_epoch, s.epochs_since_best = val_loss, s.epoch, 0
            self._save("best")
        else:
            s.epochs_since_best += 1
        self.final_metrics = values
        patience = cfg.train.early_stop_patience
        if patience and s.epochs_since_best >= patience:
            acc.print(f"early stop: no better val loss for {patience} epochs (best epoch {s.best_epoch})")
            return True
        return False

    def _fold_epoch_loss(self) -> None:
        """Add the ranks' mean of the loss summed since the last fold to the state (same on every rank)."""
        self.state.epoch_loss_sum += float(self.accelerator.reduce(self.epoch_loss.clone(), "mean"))
        self.epoch_loss.zero_()

    def _end_train_epoch(self) -> None:
        """Log the epoch-mean training loss at the 1-based epoch (as val/test are) and, with
        ``optim.plateau_on=train``, step ReduceLROnPlateau on it (seed 004's schedule)."""
        s = self.state
        self._fold_epoch_loss()
        if s.epoch_loss_steps:
            mean = s.epoch_loss_sum / s.epoch_loss_steps
            self.tracker.log({"train/epoch_loss": mean, "epoch": s.epoch}, step=s.step, epoch=s.epoch)
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and self.cfg.optim.plateau_on == "train":
                self.scheduler.step(mean)
        s.epoch_loss_sum, s.epoch_loss_steps = 0.0, 0

    def _save(self, name: str) -> Path:
        self._fold_epoch_loss()
        return save_checkpoint(self.accelerator, self.ckpt_root, name, self.state, self.cfg.train.keep_last)

    def _write_summary(self) -> None:
        s = self.state
        if not self.accelerator.is_main_process:
            return
        summary = {
            "completed": True, "step": s.step, "epoch": s.epoch, "wandb_run_id": s.wandb_run_id,
            "resumed_from": s.resumed_from, "best_val": s.best_val, "best_epoch": s.best_epoch,
            "train_seconds": s.train_seconds, "img_per_s": s.images_seen / max(s.train_seconds, 1e-9),
            "world_size": self.world, "peak_rss_mb": vm_hwm_mb(), **self.final_metrics,
        }
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.accelerator.print(f"done: step {s.step}; run folder {self.cfg.run_dir} (figures/, metrics.jsonl, wandb/)")


def train(cfg: Config) -> int:
    """Build a :class:`Trainer` and run it; returns the process exit code."""
    return Trainer(cfg).fit()
