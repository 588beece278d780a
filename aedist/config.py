"""Typed configuration: the dataclasses below are the schema, YAML files hold only what differs.

    cfg = load_config("configs/seeds/fashion_rotated.yaml", ["train.epochs=3", "optim.lr=3e-4"])

Every field carries a one-line doc (``metadata["doc"]``) and, where it has one, its allowed range or
choices. A bad key, type or value raises :class:`~aedist.errors.UserError` naming the key, the value
and what is allowed, so entry scripts exit with code 2 and one line. ``python -m aedist.config``
prints the reference table that the README shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aedist.errors import UserError


def _f(default: Any, doc: str, **rules: Any) -> Any:
    """A dataclass field with a one-line doc and optional ``min``/``max`` rules."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **rules})
    return field(default=default, metadata={"doc": doc, **rules})


@dataclass
class RunConfig:
    name: str = _f("debug", "Run name: the folder runs/NAME and the W&B run name.")
    dir: str = _f("runs", "Parent folder of all run folders.")


@dataclass
class DataConfig:
    shards: str = _f("shards/fashion4", "Folder made by launch/pack.py (manifest.json + tar shards).")
    batch_size: int = _f(256, "Global batch per optimizer step, split over ranks and accumulation.", min=1)
    eval_batch_size: int = _f(1024, "Per-rank batch for validation, test and figures.", min=1)
    shuffle_buffer: int = _f(8192, "Samples held by the shuffle buffer that mixes blocks.", min=0)
    limit: int = _f(0, "Use at most this many samples per split (0 = all); for debugging.", min=0)
    normalize: bool = _f(False, "Feed and reconstruct (x - 0.5) / 0.5 instead of [0, 1] (seed 001).")
    on_error: Literal["raise", "skip"] = _f("raise", "A corrupt shard stops the run, or is skipped and counted.")
    pin_memory: bool = _f(True, "Pin host batches before the device copy (only used with CUDA).")


@dataclass
class ModelConfig:
    name: str = _f("conv_ae", "Registered model: conv_ae, conv_vae, mlp_ae, mlp_vae.")
    in_channels: int = _f(1, "Image channels; must match the shards.", min=1)
    image_size: int = _f(28, "Image height and width; must match the shards.", min=4)
    latent_dim: int = _f(2, "Latent size; 0 keeps a conv encoder's flattened feature map (seed 003).", min=0)
    channels: list[int] = _f([32, 64, 128], "Conv channels per stage.")
    first_stride: int = _f(2, "Stride of the first stage's conv (1 keeps full resolution, seed 001).", min=1, max=2)
    convs_per_stage: int = _f(1, "Convs per stage: 1, or 2 with an extra stride-1 conv (seed 001).", min=1, max=2)
    hidden: list[int] = _f([392], "Hidden widths of MLP models.")
    latent_act: bool = _f(False, "ReLU on the latent and after the decoder's first linear (seeds 001, 004).")
    output_act: Literal["sigmoid", "none"] = _f("sigmoid", "Output activation of the decoder.")
    dropout: float = _f(0.0, "Dropout probability (Dropout2d in conv models).", min=0.0, max=0.95)
    dropout_at: list[int] = _f([], "Stage boundaries that get dropout; empty = after every layer.")
    batchnorm: bool = _f(False, "BatchNorm after every hidden conv (seed 003's regularized AE).")
    init: Literal["default", "xavier"] = _f("default", "Weight init; xavier = Xavier-uniform, bias 0.01 (seed 001).")


@dataclass
class LossConfig:
    name: Literal["mse", "bce"] = _f("mse", "Reconstruction loss, mean over pixels.")
    beta: float = _f(1.0, "Weight of the KL term for VAEs.", min=0.0)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = _f("adam", "Optimizer.")
    lr: float = _f(1e-3, "Learning rate (never rescaled with the number of ranks).", min=0.0)
    weight_decay: float = _f(0.0, "Weight decay (L2 for adam/sgd, decoupled for adamw).", min=0.0)
    momentum: float = _f(0.0, "SGD momentum.", min=0.0, max=1.0)
    scheduler: Literal["none", "plateau", "cosine"] = _f("none", "LR schedule: none, ReduceLROnPlateau (see plateau_on), cosine.")
    warmup_steps: int = _f(0, "Linear warmup steps for the cosine schedule.", min=0)
    plateau_factor: float = _f(0.5, "ReduceLROnPlateau factor.", min=0.0, max=1.0)
    plateau_patience: int = _f(3, "ReduceLROnPlateau patience in epochs.", min=0)
    plateau_on: Literal["val", "train"] = _f("val", "Loss ReduceLROnPlateau watches: val loss (every eval) or epoch-mean train loss (seed 004).")
    grad_clip: float = _f(0.0, "Clip the global grad norm to this (0 = off).", min=0.0)
    fused: bool = _f(False, "Fused Adam kernels (CUDA only; ignored on CPU).")


@dataclass
class TrainConfig:
    epochs: int = _f(10, "Epochs to train.", min=1)
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = run all epochs).", min=0)
    seed: int = _f(0, "Seed for weights, shuffling and corruption draws.", min=0)
    grad_accum: int = _f(1, "Gradient accumulation steps per optimizer step.", min=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "Autocast precision (bf16 works on CPU).")
    channels_last: bool = _f(False, "channels_last memory format (a GPU speed-up).")
    compile: bool = _f(False, "torch.compile the model.")
    cpu: bool = _f(False, "Force CPU even where CUDA is present.")
    checkpoint_every: int = _f(0, "Checkpoint every N optimizer steps (0 = at each epoch end).", min=0)
    keep_last: int = _f(2, "Complete step checkpoints to keep (best is kept apart).", min=1)
    resume: str = _f("auto", "auto = newest complete checkpoint of this run, never, or a checkpoint path.")
    early_stop_patience: int = _f(0, "Stop after N epochs without a better val loss (0 = off).", min=0)
    max_bad_steps: int = _f(0, "Skip up to N non-finite-loss steps before stopping (0 = stop on the first).", min=0)
    eval_every: int = _f(1, "Validate and test every N epochs.", min=1)


@dataclass
class LogConfig:
    wandb: Literal["online", "offline", "disabled"] = _f("offline", "W&B mode; offline runs sync later with `wandb sync`.")
    project: str = _f("aedist", "W&B project.")
    entity: str | None = _f(None, "W&B entity (team or user).")
    group: str | None = _f(None, "W&B group, e.g. one per sweep or seed experiment.")
    tags: list[str] = _f([], "W&B tags.")
    tensorboard: bool = _f(False, "Also log scalars to TensorBoard through Accelerate.")
    every: int = _f(10, "Log step metrics every N optimizer steps.", min=1)
    figures_every: int = _f(1, "Draw figures every N epochs (and always after the last).", min=1)
    probe_size: int = _f(64, "Test images in the fixed probe set for figures.", min=8)


@dataclass
class EvalConfig:
    corruptions: dict[str, list] = _f({}, "Named test-time corruption lists, e.g. {rotated: [{rotate: {max_degrees: 180}}]}.")
    knn_k: int = _f(5, "Neighbours for the latent kNN class accuracy.", min=1)
    knn_train: int = _f(5000, "Train samples whose latents fit the kNN classifier.", min=10)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    corruption: list = field(default_factory=list, metadata={"doc": "Ordered training corruptions (see aedist.data.corrupt)."})
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        """The run folder ``run.dir/run.name``."""
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    def model_hash(self) -> str:
        """Hash of everything that fixes the shape of the weights; checkpoints must match it."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation


def _fail(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config key '{key}': bad value {value!r}; {allowed}")


def _coerce(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and the field's rules; return it coerced."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(key, value, f"allowed: {', '.join(map(str, choices))}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0], meta)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _fail(key, value, "expected a list, e.g. [1, 2]")
        (item,) = typing.get_args(tp) or (Any,)
        return [v if item is Any else _coerce(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(key, value, "expected a mapping, e.g. {name: value}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "expected an integer")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, "expected a number")
        value = float(value)
    elif tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise _fail(key, value, "expected a string")
        value = str(value)
    if "min" in meta and value < meta["min"]:
        raise _fail(key, value, f"must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise _fail(key, value, f"must be <= {meta['max']}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise UserError(f"unknown config key '{path}'{hint} (known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise _fail(path, value, f"expected a section with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
            kwargs[key] = _build(tp, value, f"{path}.")
        else:
            kwargs[key] = _coerce(path, value, tp, dict(fields[key].metadata))
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "corruptions":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}``; the value is read as YAML."""
    if "=" not in item:
        raise UserError(f"bad override '{item}': write key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def validate_corruption(spec: list) -> None:
    """Check the corruption list with the corruption module's own validator (kept lazy: torch import)."""
    from aedist.data.corruption import validate_spec

    try:
        validate_spec(spec)
    except ValueError as err:
        raise UserError(f"config key 'corruption': {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} not found; pass an existing file such as configs/debug.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {str(p)!r} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(p)!r} must hold a mapping of sections")
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    cfg = _build(Config, data, "")
    validate_corruption(cfg.corruption)
    for name, spec in cfg.eval.corruptions.items():
        if not isinstance(spec, list):
            raise _fail(f"eval.corruptions.{name}", spec, "expected a corruption list")
        validate_corruption(spec)
    return cfg


def sweep_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Accept W&B sweep arguments: ``${args_no_hyphens}`` passes everything as key=value, so
    ``config=PATH`` picks the experiment file; inside a sweep agent each trial gets its own run
    folder (``run.name`` + the agent's WANDB_RUN_ID), else ``train.resume=auto`` would continue
    the previous trial."""
    config = next((o.split("=", 1)[1] for o in overrides if o.startswith("config=")), config)
    overrides = [o for o in overrides if not o.startswith("config=")]
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        overrides.append(f"run.name={load_config(config, overrides).run.name}-{run_id}")
    return config, overrides


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from ``Config.to_dict()`` output (e.g. a run's config.yaml)."""
    return _build(Config, data, "")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (kept in the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(tp):
            rows.append(f"| `{section.name}` | `[]` | {section.metadata['doc']} |")
            continue
        for f in dataclasses.fields(tp):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append(f"| `{section.name}.{f.name}` | `{json.dumps(default)}` | {f.metadata['doc']} |")
    return "\n".join(rows)


def _main(argv: list[str]) -> int:
    """``python -m aedist.config`` prints the reference; ``--run-dir CONFIG [k=v ...]`` prints a run folder."""
    if argv[:1] == ["--run-dir"] and len(argv) >= 2:
        print(load_config(argv[1], argv[2:]).run_dir)
    else:
        sys.stdout.write(reference_markdown() + "\n")
    return 0


if __name__ == "__main__":
    from aedist.errors import run_cli

    run_cli(_main)
