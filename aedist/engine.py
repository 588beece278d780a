"""The training loop: the only module that holds the Accelerator.

    accelerate launch launch/train.py --config configs/seeds/fashion_rotated.yaml train.epochs=3
    python launch/train.py --config configs/debug.yaml            # one process, CPU or one GPU

One optimizer step = ``train.grad_accum`` micro-batches of ``data.batch_size / (ranks * accum)``
images per rank. At every step boundary the ranks agree, in one all-reduce, on two flags: a
preemption signal arrived (SIGUSR1/SIGTERM) and a loss was not finite. Preemption saves a
checkpoint on every rank at the same step and exits with :data:`REQUEUE_EXIT_CODE`. What to save
when is :class:`~aedist.checkpoint.CheckpointPolicy`'s business, the learning rate
:class:`~aedist.optim.Schedule`'s; :meth:`Trainer.fit` only calls them.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta  # issue 25 item 7

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed  # InitProcessGroupKwargs: issue 25 item 7
from tqdm.auto import tqdm

from aedist import precision
from aedist.batch import prepare_batch
from aedist.checkpoint import (
    CheckpointPolicy,
    DamagedCheckpoint,
    TrainState,
    find_resume,
    load_checkpoint,
    load_newest_usable,
    newest_checkpoint,
)
from aedist.config import Config, save_config
from aedist.data import BatchStream, DataPosition, load_batches, num_batches, read_manifest
from aedist.data.corruption import make_generator
from aedist.data.remote import mask_url, set_cache_defaults
from aedist.errors import UserError
from aedist.evaluation import draw_figures, eval_split, evaluate_split, knn_metric, load_probe
from aedist.evaluation.backbones import check_backbones
from aedist.models import build_model
from aedist.objectives import build_objective
from aedist.optim import EMA, Schedule, build_optimizer, skips_on_device, step_unless
from aedist.resume import RunLock, apply_changes, check_changes, config_changes, previous_config, record_resume
from aedist.runs import COLLAPSED
from aedist.signals import INTERRUPT_EXIT_CODE, PREEMPT_EXIT_CODE, STOP
from aedist.sysinfo import device_name, vm_hwm_mb
from aedist.throughput import count_model_flops, peak_flops, peak_memory_gb
from aedist.tracking import Tracker, new_run_id, trackers_for

REQUEUE_EXIT_CODE = PREEMPT_EXIT_CODE  # 75: "preempted, checkpoint saved, run me again" (slurm/ requeues on it)
# Fault injection for tests and drills: AEDIST_INJECT_NAN="RANK:STEP[:TERM]" makes that rank's loss (or the
# objective's term TERM, e.g. disc_loss) NaN at that 1-based step.
INJECT_NAN = os.environ.get("AEDIST_INJECT_NAN", "")


class Diverged(RuntimeError):
    """The loss stayed non-finite for more than ``train.max_bad_steps`` steps."""


@dataclass
class StepResult:
    """What one optimizer step reports: mean loss terms over its micro-batches (device tensors, not
    read until the next log), seconds spent waiting for data, and the model inputs it processed."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    data_wait: float = 0.0
    inputs: int = 0


class Trainer:
    """Builds everything from a config, resumes if asked, and runs :meth:`fit`."""

    def __init__(self, cfg: Config, *, debug: bool = False) -> None:
        self.stop = STOP.install()  # launch/train.py installs it earlier; here for library callers
        self.cfg = cfg
        t = cfg.train
        device = torch.device("cuda" if torch.cuda.is_available() and not t.cpu else "cpu")
        self.mixed_precision = precision.resolve_mixed_precision(t.mixed_precision, device)
        # A second Trainer in one process (a notebook, the tests) may resolve another precision; the
        # AcceleratorState singleton would refuse it. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(
            cpu=device.type == "cpu", mixed_precision=self.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with=trackers_for(cfg) or None, project_dir=str(cfg.run_dir),
            # issue 25 item 7: a rank that stops arriving ends the job after this long (launch/train.py says which, exit 124)
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout_s))],
        )
        self.world, self.rank = acc.num_processes, acc.process_index
        self.lock = RunLock(cfg.run_dir) if acc.is_main_process else None
        set_cache_defaults(cfg.data.cache_dir, cfg.data.cache_max_gb)  # where URL shards land, for every read below
        self.manifest = read_manifest(cfg.data.shards)
        self.train_size = self.manifest.split("train").num_samples  # N of the loader's repeat ids (copy k of sample i: i + k*N)
        self._check_inputs()
        # Metrics that need pretrained backbones (lpips, rfid): their weights are on disk, or one line now.
        check_backbones(cfg.eval.metrics, cfg.eval.lpips_net, tuple(self.manifest.shape[-2:]))
        self.has_val = "val" in self.manifest.splits
        # issue 27: a pack without test (an own-images folder) is evaluated on val; with neither, not at all
        self.eval_split = eval_split(self.manifest.splits)
        if self.eval_split is None:
            acc.print(f"note: {mask_url(cfg.data.shards)} has no val or test split, so nothing is evaluated "
                      "(pack with --val-fraction/--test-fraction > 0 for metrics and figures)")
        self.per_rank = cfg.data.batch_size // (self.world * t.grad_accum)
        self.steps_per_epoch = num_batches(cfg.data.shards, "train", self.per_rank, self.world, limit=cfg.data.limit,
                                           repeat=cfg.data.repeat) // t.grad_accum
        if self.steps_per_epoch == 0:
            cause = f"data.limit={cfg.data.limit}" if cfg.data.limit else f"the train split of {mask_url(cfg.data.shards)}"
            raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than {cause}; lower the batch size")
        epoch_steps = t.epochs * self.steps_per_epoch
        self.total_steps = epoch_steps if t.max_steps == 0 else min(t.max_steps, epoch_steps)

        set_seed(t.seed)  # identical initial weights on every rank, whatever DDP's broadcast does
        model = build_model(cfg.model)
        self.channels_last = precision.resolve_channels_last(t.channels_last, model, device, self.mixed_precision)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.compiled = precision.resolve_compile(t.compile, debug=debug, total_steps=self.total_steps, device=device)
        # Counted once, on a meta-device copy (no arithmetic, no RNG draw): what TFLOP/s and MFU divide by.
        self.flops_per_input = count_model_flops(model, tuple(self.manifest.shape))
        self.peak_flops = peak_flops(device, self.mixed_precision)
        optimizer = build_optimizer(model, cfg.optim, on_cuda=device.type == "cuda")
        # The objective decides what a step is; its extra networks (a discriminator) and their optimizers
        # are prepared, clipped, stepped and checkpointed beside the model's (model_1.safetensors, ...).
        self.objective = build_objective(cfg).to(acc.device)
        extra = self.objective.trainable()
        extra_opts = self.objective.optimizers(extra, on_cuda=device.type == "cuda")
        # Accelerate prepares the plain module (checkpoints and unwrap_model see no ``_orig_mod.``);
        # the training step calls a compiled handle that shares its parameters: one graph for all epochs.
        self.model, *rest = acc.prepare(model, *extra.values(), optimizer, *extra_opts.values())
        self.networks = dict(zip(extra, rest[:len(extra)]))
        self.optimizer, *opts = rest[len(extra):]
        self.extra_optimizers = dict(zip(extra_opts, opts))
        self.ema = EMA(acc.unwrap_model(self.model), t.ema_decay) if t.ema_decay else None
        self.forward = precision.compile_model(self.model, device) if self.compiled else self.model
        self.schedule = Schedule(self.optimizer.optimizer, cfg.optim, self.total_steps)
        if self.schedule.inner is not None:
            acc.register_for_checkpointing(self.schedule)
        if self.ema is not None:  # custom_checkpoint_N.pkl, restored with everything else (evaluate.py finds it by its keys)
            acc.register_for_checkpointing(self.ema)
        self.ckpt_root = cfg.run_dir / "checkpoints"
        self.checkpoints = CheckpointPolicy(acc, self.ckpt_root, t.checkpoint_every, t.keep_last, self._before_save)
        self.stream: BatchStream | None = None  # the epoch being read: its position goes into checkpoints
        self.state = self._resume_or_start()
        previous_world = self.state.world_sizes[-1] if self.state.world_sizes else self.world
        if previous_world != self.world:
            acc.print(f"resumed on a different world size: {previous_world} -> {self.world} processes")
        self.state.world_sizes.append(self.world)
        # Device-side counters of the sync-free step, read at _sync: skipped steps, the last one, applied steps.
        self.bad_count = torch.tensor(self.state.bad_steps, dtype=torch.long, device=acc.device)
        self.last_bad = torch.zeros((), dtype=torch.long, device=acc.device)
        self.good_steps = torch.zeros((), dtype=torch.long, device=acc.device)
        self.device_skip = all(skips_on_device(o) for o in (self.optimizer, *self.extra_optimizers.values()))
        self.sync_every = t.sync_every or cfg.log.every
        self.first_step = self.state.step + 1
        # On a 2-core CPU a reader thread only competes with the step's own threads; on CUDA it hides the read.
        self.prefetch = cfg.data.prefetch if cfg.data.prefetch != "auto" else device.type == "cuda"
        self.totals = {"inputs": 0, "wait": 0.0, "seconds_before": self.state.train_seconds}  # this start's throughput
        # After the process group is up: NCCL may have installed its own SIGUSR1 handler (NVIDIA/nccl#704).
        self.stop.listen(t.preempt_signal)
        self._plan_remaining_steps()
        # This rank's sum of step losses since the last fold into state.epoch_loss_sum (kept on the
        # device so the hot loop never syncs; folded across ranks at checkpoints and epoch ends).
        self.epoch_loss = torch.zeros((), device=acc.device)
        self.final_metrics: dict[str, float] = {}
        self.evaluated_at = -1
        self.collapsed = False  # the last evaluation's outputs barely varied between images (_watch_collapse)
        if acc.is_main_process:
            save_config(cfg, cfg.run_dir / "config.yaml")
            precision.note_resolved(cfg.run_dir / "config.yaml", device, self.world, self.mixed_precision, self.channels_last, self.compiled)
            launcher = ["python"] if self.world == 1 else ["accelerate", "launch", "--num_processes", str(self.world)]
            with open(cfg.run_dir / "command.txt", "a") as fh:  # every (re)start, as typed, for the report
                fh.write(shlex.join(launcher + sys.argv) + "\n")
        acc.print(self.objective.describe())
        acc.print(f"precision: mixed_precision={self.mixed_precision} channels_last={self.channels_last} "
                  f"compile={self.compiled} on {device.type} x{self.world}")
        self.tracker = Tracker(acc, cfg, self.state.wandb_run_id)
        if previous_world != self.world:
            self.tracker.log({"resume/world_size": self.world, "resume/previous_world_size": previous_world},
                             step=self.state.step, epoch=self.state.epoch)

    def _check_inputs(self) -> None:
        """Everything that can be checked before step 1, so no epoch is lost to a late error."""
        m, c = self.manifest, self.cfg
        want = (c.model.in_channels, c.model.image_size, c.model.image_size)
        if tuple(m.shape) != want:
            # issue 27: name the keys and the shards' values, so a config made for other images is one override away
            fix = (f"set model.in_channels={m.shape[0]} model.image_size={m.shape[1]}, or pick other shards" if m.shape[1] == m.shape[2]
                   else "pick shards of square images")
            raise UserError(f"shards {mask_url(c.data.shards)} hold images {tuple(m.shape)} but the model expects {want}; {fix}")
        if c.data.repeat_clean and (not c.corruption or c.data.repeat_clean >= c.data.repeat):
            raise UserError(f"data.repeat_clean={c.data.repeat_clean} keeps copies clean of a corruption, so it needs a corruption "
                            f"and fewer clean copies than data.repeat={c.data.repeat}; set data.repeat_clean=0 or data.repeat higher")
        if c.data.repeat_clean and any("copies" in op for op in c.corruption):
            # the two ways of adding rotated copies (seed 000's expansion vs in-batch) do not combine: the keep
            # mask is per image, copies grow the batch. prepare_batch refuses it too, for extension ops that grow it
            raise UserError(f"data.repeat_clean={c.data.repeat_clean} does not combine with the in-batch `copies` corruption; "
                            "use data.repeat with `rotate`, or `copies` with data.repeat_clean=0")
        per = self.world * c.train.grad_accum
        if c.data.batch_size % per:
            raise UserError(f"data.batch_size={c.data.batch_size} does not divide over {self.world} ranks x "
                            f"{c.train.grad_accum} accumulation steps; use a multiple of {per}")
        from aedist.data.corruption import validate_spec
        from aedist.data.shards import verify_shard

        if "://" not in c.data.shards:  # URL shards are verified as they arrive in the cache
            # Every split now (sha256, cached per process for the loader): a corrupt test shard must not
            # surface at the end of epoch 1. With data.on_error=skip it is counted when read instead.
            for split in m.splits.values():
                for shard in split.shards:
                    try:
                        verify_shard(m, shard)
                    except UserError:
                        if c.data.on_error == "raise":
                            raise

        for key, spec in [("corruption", c.corruption), *((f"eval.corruptions.{k}", v) for k, v in c.eval.corruptions.items())]:
            try:
                validate_spec(spec, tuple(m.shape))
            except ValueError as err:
                raise UserError(f"config key '{key}': {err}") from None
        if "val" not in m.splits:
            if c.train.early_stop_patience:
                raise UserError(f"train.early_stop_patience needs a val split, and {mask_url(c.data.shards)} has none; "
                                "pack with --val-fraction > 0 or set train.early_stop_patience=0")
            if c.optim.scheduler == "plateau" and c.optim.plateau_on == "val":
                raise UserError(f"optim.plateau_on=val needs a val split, and {mask_url(c.data.shards)} has none; "
                                "set optim.plateau_on=train or pack with --val-fraction > 0")

    def _resume_or_start(self) -> TrainState:
        """A fresh state, or the checkpoint ``train.resume`` picks with the config's changes applied."""
        from aedist.resume import check_same_data, data_hash

        cfg, acc = self.cfg, self.accelerator
        fresh = TrainState(wandb_run_id=new_run_id(), model_hash=cfg.model_hash(), model=asdict(cfg.model), data_hash=data_hash(self.manifest))
        explicit = find_resume(cfg.train.resume)
        if explicit is not None:
            try:
                state = load_checkpoint(acc, explicit, cfg.model_hash())
            except DamagedCheckpoint as err:
                raise UserError(f"checkpoint {explicit} is damaged ({err.problem}); point train.resume at another one") from None
            if explicit.resolve().parent != self.ckpt_root.resolve():
                # Another run's checkpoint seeds a new run: its own W&B run, recording where it came from.
                acc.print(f"starting from {explicit} (step {state.step}) as a new run")
                return replace(state, wandb_run_id=fresh.wandb_run_id, started_from=str(explicit), resumed_from=[], world_sizes=[],
                               data_hash=fresh.data_hash)  # fine-tuning may use other data: this run's own is recorded
            folder = explicit
        elif cfg.train.resume == "auto" and (found := load_newest_usable(acc, self.ckpt_root, cfg.model_hash())):
            state, folder = found
        else:
            return fresh
        previous = previous_config(cfg.run_dir)
        changes = config_changes(previous, cfg.to_dict()) if previous else {}
        check_changes(changes, cfg.run_dir)
        check_same_data(state.data_hash, fresh.data_hash, mask_url(cfg.data.shards), cfg.run_dir)
        state.data_hash = fresh.data_hash  # a checkpoint from before the hash existed: checked from now on
        apply_changes(changes, self.optimizer, self.schedule)
        for key, (was, now) in changes.items():
            acc.print(f"resume: {key} changed {was!r} -> {now!r}; in effect from step {state.step + 1}")
        if acc.is_main_process:
            record_resume(cfg.run_dir, {"step": state.step, "world_size": self.world, "from": str(folder),
                                        "changed": {k: list(v) for k, v in changes.items()}})
            # A finished run resumed for more epochs is unfinished again until its new summary: the old one would
            # pass the longer metrics.jsonl off as finished (to the report, its records and reproduce.sh).
            (cfg.run_dir / "summary.json").unlink(missing_ok=True)
        state.resumed_from.append(state.step)
        where = DataPosition.from_dict(state.data_position).describe() if state.data_position else f"epoch {state.epoch}, batch {state.batch}"
        acc.print(f"resumed from {folder} (step {state.step}; {where})")
        return state

    def _plan_remaining_steps(self) -> None:
        """Total steps = done + what the resumed epoch still holds on this world and batch geometry +
        the later epochs; the cosine schedule stretches or shrinks to it (a batch change alters it)."""
        s, t = self.state, self.cfg.train
        if s.epoch >= t.epochs:
            left = 0
        elif s.data_position and s.data_position.get("epoch") == s.epoch:
            pos = DataPosition.from_dict(s.data_position).relayout(self.world, self.per_rank, t.grad_accum)
            left = pos.remaining // self.per_rank // t.grad_accum + (t.epochs - s.epoch - 1) * self.steps_per_epoch
        else:  # an epoch's start, or a checkpoint from before data positions: ``batch`` micro-batches in
            left = max(self.steps_per_epoch - s.batch // t.grad_accum, 0) + (t.epochs - s.epoch - 1) * self.steps_per_epoch
        planned = s.step + left
        self.total_steps = planned if t.max_steps == 0 else min(t.max_steps, planned)
        self.schedule.total_steps = self.total_steps

    def _open_epoch(self) -> BatchStream:
        """This rank's stream of the current epoch, from the checkpointed position if it is in this epoch."""
        cfg, s, acc = self.cfg, self.state, self.accelerator
        pos = s.data_position if s.data_position and s.data_position.get("epoch") == s.epoch else None
        stream = load_batches(
            cfg.data.shards, "train", self.per_rank, self.rank, self.world, seed=cfg.train.seed, epoch=s.epoch,
            device=acc.device, position=pos, start_batch=0 if pos else s.batch, batches_per_step=cfg.train.grad_accum,
            limit=cfg.data.limit, on_error=cfg.data.on_error, shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=cfg.data.pin_memory,
            prefetch=self.prefetch, repeat=cfg.data.repeat, return_ids=cfg.data.repeat_clean > 0)
        if pos is not None and stream.start is not None:
            acc.print(f"data position: {stream.start.describe()}")
        return stream

    # ------------------------------------------------------------------ one step

    def _agree_count(self, steps: int) -> int:
        """The fewest steps any rank's stream holds (one all-reduce per epoch)."""
        if self.world == 1:
            return steps
        counts = self.accelerator.gather(torch.tensor([steps], device=self.accelerator.device))
        fewest = int(counts.min())
        if fewest != steps:
            self.accelerator.print(f"warning: ranks hold {counts.tolist()} steps this epoch; all take {fewest}")
        return fewest

    def _step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], want_norm: bool) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches, with no host-device sync: whether any
        loss was non-finite on any rank is a device flag (all-reduced on the device) that the fused
        optimizers read as ``found_inf`` and the EMA as a mask; the counts are read at :meth:`_sync`.
        The grad norm is computed only when clipping or logging needs it (it walks every parameter)."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        accum = cfg.train.grad_accum
        res = StepResult()
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        inject = INJECT_NAN.split(":")

        def backward(loss: torch.Tensor, name: str) -> None:
            nonlocal bad
            if inject[:2] == [str(self.rank), str(s.step + 1)] and (inject[2:] or ["loss"])[0] == name:
                loss = loss * float("nan")
            bad = bad | ~torch.isfinite(loss.detach())  # every loss a network learns from is guarded, not just the model's
            acc.backward(loss)

        unwrapped = acc.unwrap_model(self.model)
        for micro in range(accum):
            t0 = time.perf_counter()
            images, _, *ids = next(batches)
            res.data_wait += time.perf_counter() - t0
            # data.repeat_clean: copies k < repeat_clean of each image (id // N = k) stay uncorrupted
            keep = (ids[0] // self.train_size < cfg.data.repeat_clean).to(images.device, non_blocking=True) if ids else None
            with acc.accumulate(self.model, *self.networks.values()):
                gen = make_generator(cfg.train.seed, self.rank, s.step * accum + micro, images.device) if cfg.corruption else None
                batch = prepare_batch(images, cfg.corruption, gen, normalize=cfg.data.normalize, channels_last=self.channels_last, keep=keep)
                res.inputs += batch.inputs.shape[0] * self.world
                precision.begin_step(self.compiled, acc.device)
                terms = self.objective.micro_step(unwrapped, self.forward, batch, s.step, self.networks, backward)
            for k, v in terms.items():
                res.terms[k] = res.terms.get(k, 0.0) + v.detach() / accum
            s.batch += 1
        if self.world > 1:  # a device collective: every rank skips alike, and the host does not wait for it
            bad = acc.reduce(bad.float(), "sum") > 0
        optimizers = {"": self.optimizer, **self.extra_optimizers}
        nets = {"": self.model, **self.networks}
        # Without fused kernels (optim.fused=false) or under fp16's GradScaler the host reads the flag.
        apply = self.device_skip or not bool(bad)
        for name, opt in optimizers.items():
            if cfg.optim.grad_clip or want_norm:
                norm = acc.clip_grad_norm_(nets[name].parameters(), cfg.optim.grad_clip or math.inf)
                res.terms[f"{name}_grad_norm" if name else "grad_norm"] = norm
            if not apply or not any(p.grad is not None for group in opt.param_groups for p in group["params"]):
                continue  # a network without gradients (a discriminator before disc_start) is not stepped at all
            if self.device_skip:
                step_unless(opt, bad)
            else:
                opt.step()
        self.schedule.after_step()  # a skipped step still counts for the learning-rate schedule
        if self.ema is not None and apply:
            self.ema.update(unwrapped, bad)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.bad_count += bad.long()
        self.last_bad = torch.where(bad, s.step + 1, self.last_bad)
        self.epoch_loss += torch.where(bad, 0.0, res.terms["loss"].float())
        self.good_steps += (~bad).long()
        return res

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to the end (exit code 0) or until preempted (exit code :data:`REQUEUE_EXIT_CODE`)."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        accum = cfg.train.grad_accum
        probe = load_probe(cfg, acc.device) if acc.is_main_process else None
        bar = tqdm(total=self.total_steps, initial=s.step, disable=not acc.is_main_process, dynamic_ncols=True)
        window = {"t": time.perf_counter(), "images": 0, "inputs": 0, "wait": 0.0}
        while s.epoch < cfg.train.epochs and s.step < self.total_steps:
            self.stream = batches = self._open_epoch()
            # Whole steps; the same count on every rank (drop_last layouts, and shards skipped under
            # data.on_error=skip are found by every rank alike): checked, as a mismatch would hang DDP.
            micro = self._agree_count(len(batches) // accum) * accum
            s.batch = 0
            while s.batch < micro and s.step < self.total_steps:
                t0 = time.perf_counter()
                n = s.step + 1
                log_now = n % cfg.log.every == 0 or n == self.total_steps
                # The host waits for the device only here: log intervals, train.sync_every, before a
                # checkpoint (never one saved past a divergence), at the epoch's last step, and at this
                # start's first step (a signal that came during start-up is acted on at once).
                sync_now = (log_now or n % self.sync_every == 0 or self.checkpoints.due(n) or s.batch + accum >= micro
                            or n == self.first_step)
                res = self._step(batches, want_norm=log_now)
                s.step += 1
                s.images_seen += cfg.data.batch_size
                s.train_seconds += time.perf_counter() - t0
                window["images"] += cfg.data.batch_size
                window["inputs"] += res.inputs
                window["wait"] += res.data_wait
                self.totals["inputs"] += res.inputs
                self.totals["wait"] += res.data_wait
                preempt, interrupt = self._sync() if sync_now else (False, False)
                if log_now:
                    self._log_step(res.terms, window, bar)
                bar.update(1)
                self.checkpoints.after_step(s, preempted=preempt or interrupt)
                if preempt or interrupt:
                    return self._stop_now(preempt, bar)
            if s.batch >= micro:  # a full epoch, not a max_steps cut
                batches.close()
                self.stream = None
                s.epoch, s.batch, s.data_position = s.epoch + 1, 0, None
                last = s.epoch >= cfg.train.epochs or s.step >= self.total_steps
                self._end_train_epoch()
                if (s.epoch % cfg.train.eval_every == 0 or last) and self._evaluate(probe, last):
                    break
                self.checkpoints.after_epoch(s, last)
        bar.close()
        if self.evaluated_at != s.step:  # max_steps ended mid-epoch: the final numbers still get measured
            self._evaluate(probe, last=True)
        self.checkpoints.finish(s)
        self._write_summary()
        self.tracker.log_checkpoint(self.ckpt_root / f"step-{s.step}", s.step, "last")  # issue 27 item 3: after summary.json, which it carries
        self.close()
        return 0

    def _stop_now(self, preempt: bool, bar: tqdm) -> int:
        """After the stop checkpoint: say why, close the trackers, release the run folder."""
        s = self.state
        code = PREEMPT_EXIT_CODE if preempt else INTERRUPT_EXIT_CODE
        why = "preempted" if preempt else "interrupted"
        self.accelerator.print(f"{why}: saved step {s.step}; exiting with {code}" + (" to be requeued" if preempt else ""))
        bar.close()
        self.close()
        return code

    def close(self) -> None:
        """Flush the trackers and release the run folder (safe to call twice)."""
        self.tracker.close()
        if self.lock is not None:
            self.lock.release()

    def _sync(self) -> tuple[bool, bool]:
        """The host's one wait for the device between log intervals: agree on stop signals (one small
        all-reduce) and read the skipped-step count, stopping on divergence. Returns (preempt, interrupt),
        the same on every rank (the count is the same everywhere: it counts the all-reduced flags)."""
        acc, s, allowed = self.accelerator, self.state, self.cfg.train.max_bad_steps
        flags = torch.tensor([self.stop.preempt, self.stop.interrupt], dtype=torch.long, device=acc.device)
        if self.world > 1:
            flags = acc.reduce(flags, "sum")
        preempt, interrupt, bad, last = torch.stack([flags[0], flags[1], self.bad_count, self.last_bad]).tolist()
        if bad > s.bad_steps:
            new, s.bad_steps = bad - s.bad_steps, bad
            acc.print(f"warning: non-finite loss at step {last} ({new} step(s) skipped since the last check, "
                      f"{s.bad_steps} of {allowed} allowed); skipped steps change no weight")
            if s.bad_steps > allowed:
                newest = newest_checkpoint(self.ckpt_root)
                kept = f"the last good checkpoint {newest} is kept" if newest else "no checkpoint was written yet"
                raise Diverged(f"loss is not finite at step {last}; {kept}")
        return preempt > 0, interrupt > 0

    def _log_step(self, terms: dict[str, torch.Tensor], window: dict[str, float], bar: tqdm) -> None:
        acc, s = self.accelerator, self.state
        keys = sorted(terms)
        mean = acc.reduce(torch.stack([terms[k].float() for k in keys]).to(acc.device), "mean").tolist()
        elapsed = max(time.perf_counter() - window["t"], 1e-9)  # after the reduce above: the device is done
        values = {f"train/{k}": v for k, v in zip(keys, mean)}
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        values["train/img_per_s"] = window["images"] / elapsed
        values["train/data_wait_s"] = window["wait"]
        values["train/data_wait_share"] = window["wait"] / elapsed
        values["train/tflops"] = window["inputs"] * self.flops_per_input / elapsed / 1e12  # all ranks together
        if self.peak_flops:
            values["train/mfu"] = values["train/tflops"] * 1e12 / (self.peak_flops * self.world)
        values["train/peak_mem_gb"] = peak_memory_gb(acc.device)
        values["train/skipped_steps"] = s.bad_steps  # non-finite steps skipped so far (read at the sync just before)
        self.tracker.log(values, step=s.step, epoch=s.epoch)
        extra = {"mfu": f"{values['train/mfu']:.1%}"} if self.peak_flops else {"tflops": f"{values['train/tflops']:.3g}"}
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", lr=f"{values['train/lr']:.2g}", img_s=f"{values['train/img_per_s']:.0f}",
                        wait=f"{values['train/data_wait_share']:.0%}", **extra)
        window.update(t=time.perf_counter(), images=0, inputs=0, wait=0.0)

    def _before_save(self) -> None:
        """Runs on every rank before each checkpoint: fold the loss sums, record the data position."""
        self._fold_epoch_loss()
        position = self.stream.position if self.stream is not None else None
        self.state.data_position = position.to_dict() if position is not None else None

    def _fold_epoch_loss(self) -> None:
        """Add the ranks' mean of the loss summed since the last fold, and the applied steps, to the state."""
        loss_sum, good = self.accelerator.reduce(torch.stack([self.epoch_loss.double(), self.good_steps.double()]), "mean").tolist()
        self.state.epoch_loss_sum += loss_sum
        self.state.epoch_loss_steps += round(good)
        self.epoch_loss.zero_()
        self.good_steps.zero_()

    def _end_train_epoch(self) -> None:
        """Log the epoch-mean training loss at the 1-based epoch (as val/test are) and hand it to the schedule."""
        s = self.state
        self._fold_epoch_loss()
        if s.epoch_loss_steps:
            mean = s.epoch_loss_sum / s.epoch_loss_steps
            self.tracker.log({"train/epoch_loss": mean, "epoch": s.epoch}, step=s.step, epoch=s.epoch)
            self.schedule.after_epoch(mean)
        s.epoch_loss_sum, s.epoch_loss_steps = 0.0, 0

    def _evaluate(self, probe: tuple[torch.Tensor, torch.Tensor] | None, last: bool) -> bool:
        """Validate, test, draw figures, step the schedule, keep the best; True = stop early."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        self.evaluated_at = s.step
        model = acc.unwrap_model(self.model)  # no DDP collectives inside: ranks hold different batch counts
        values, val_latents = evaluate_split(model, cfg, acc, "val") if self.has_val else ({}, None)
        test_latents = val_latents if self.eval_split == "val" else None  # val stands in for a missing test split (issue 27)
        # train.test_every: the test pass (and its kNN) can be sparser than validation, which picks the best checkpoint
        run_test = self.eval_split == "test" and (last or s.epoch % cfg.train.test_every == 0)
        if run_test:
            test_values, test_latents = evaluate_split(model, cfg, acc, "test")
            values.update(test_values)
        if test_latents is not None:
            values.update(knn_metric(model, cfg, acc, test_latents, split=self.eval_split, class_names=self.manifest.classes))
        ema = self.ema.module if self.ema is not None else None
        if ema is not None:  # the same passes on the averaged weights: val_ema/…, test_ema/…
            for split in (["val"] if self.has_val else []) + (["test"] if run_test else []):
                values.update(evaluate_split(ema, cfg, acc, split, prefix=f"{split}_ema")[0])
        val_loss = values.get("val/loss")
        self.schedule.after_eval(val_loss)
        values["epoch"] = s.epoch
        self.tracker.log(values, step=s.step, epoch=s.epoch)
        self._watch_collapse(values)
        if acc.is_main_process and probe is not None and (s.epoch % cfg.log.figures_every == 0 or last or s.epoch == 1):
            # latent plots use the test latents, or val's on epochs whose test pass train.test_every skipped
            figs = draw_figures(model, cfg, probe, test_latents if test_latents is not None else val_latents, self.manifest.classes,
                                full=last, ema_model=ema)
            self.tracker.log_images(figs, step=s.step, epoch=s.epoch)
        acc.wait_for_everyone()
        if self.checkpoints.after_eval(s, val_loss):  # issue 27 item 3: a new best -> W&B model artifact (log.wandb_artifacts)
            self.tracker.log_checkpoint(self.ckpt_root / "best", s.step, "best")
        self.final_metrics = values
        patience = cfg.train.early_stop_patience
        if patience and s.epochs_since_best >= patience:
            acc.print(f"early stop: no better val loss for {patience} epochs (best epoch {s.best_epoch})")
            return True
        return False

    def _watch_collapse(self, values: dict[str, float]) -> None:
        """Say when the outputs stop varying between images, and when they vary again. A model stuck at the
        mean image (dead ReLUs) reads as merely weak in its MSE; seed 001's first run sat there from epoch 6 to the end."""
        key = next((k for k in ("val/variety", "test/variety") if k in values), None)
        if key is None:  # eval.metrics without variety
            return
        variety, epoch = values[key], self.state.epoch
        collapsed = variety < COLLAPSED  # NaN (fewer than 2 images, constant targets) is not a collapse
        if collapsed and not self.collapsed:
            self.accelerator.print(f"warning: {key} {variety:.3f} at epoch {epoch}: the outputs barely vary between images, "
                                   f"the model gives about one image for every input (collapsed; README: Collapsed runs)")
        elif self.collapsed and not collapsed:
            self.accelerator.print(f"note: {key} back to {variety:.3f} at epoch {epoch}: the outputs vary between images again")
        self.collapsed = collapsed

    def _throughput(self) -> dict[str, float]:
        """This start's model FLOPs, TFLOP/s, MFU (GPUs in the peak table), data-wait share and peak memory."""
        secs = max(self.state.train_seconds - self.totals["seconds_before"], 1e-9)
        tflops = self.totals["inputs"] * self.flops_per_input / secs / 1e12
        out = {"flops_per_image": self.flops_per_input, "tflops": tflops, "data_wait_share": self.totals["wait"] / secs,
               "peak_mem_gb": peak_memory_gb(self.accelerator.device)}
        if self.peak_flops:
            out["mfu"] = tflops * 1e12 / (self.peak_flops * self.world)
        return out

    def _write_summary(self) -> None:
        s = self.state
        if not self.accelerator.is_main_process:
            return
        summary = {
            "completed": True, "step": s.step, "epoch": s.epoch, "wandb_run_id": s.wandb_run_id,
            "resumed_from": s.resumed_from, "started_from": s.started_from, "world_sizes": s.world_sizes, "best_val": s.best_val if math.isfinite(s.best_val) else None,
            "best_epoch": s.best_epoch, "train_seconds": s.train_seconds,
            "img_per_s": s.images_seen / max(s.train_seconds, 1e-9), "world_size": self.world,
            "mixed_precision": self.mixed_precision, "channels_last": self.channels_last, "compile": self.compiled,
            "device": device_name(str(self.accelerator.device)),  # what train_seconds and img_per_s were measured on
            "peak_rss_mb": vm_hwm_mb(), **self._throughput(), **self.final_metrics,
            **self.tracker.health(),  # issue 25 item 6: {"tracker_lost": {"wandb": STEP}} when a tracker was lost mid-run
        }
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.accelerator.print(f"done: step {s.step}; run folder {self.cfg.run_dir} (figures/, metrics.jsonl, wandb/)")


def train(cfg: Config, *, debug: bool = False) -> int:
    """Build a :class:`Trainer` and run it; returns the process exit code."""
    code = Trainer(cfg, debug=debug).fit()
    if torch.distributed.is_initialized():
        # Tear the process group down before the interpreter does: left to exit-time destructors,
        # gloo's threads sometimes abort a rank ("terminate called without an active exception").
        torch.distributed.destroy_process_group()
    return code
