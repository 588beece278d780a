"""Typed configuration: the dataclasses below are the schema, YAML files hold only what differs.

    cfg = load_config("configs/seeds/fashion_rotated.yaml", ["train.epochs=3", "optim.lr=3e-4"])

pydantic checks types, ranges and choices; this module only turns its first complaint into one line
naming the key, the value, what is allowed and (for typos) the closest valid name, raised as
:class:`~aedist.errors.UserError` so entry scripts exit with code 2. Every field's ``description``
is its one-line doc; ``python -m aedist.config`` prints the reference table that the README shows.

This module is the schema alone and imports none of the registries (models, losses, objectives,
corruptions, metrics): they import it for its types. Names that point into them are checked by
:func:`aedist.loading.load_config`, after the user's extensions (``imports:``) are imported; entry
points load configs through it. :func:`load_config` here checks types and ranges only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from aedist.errors import UserError


def _number(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    if isinstance(v, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(v)
        except ValueError:
            raise ValueError("expected a number") from None
    return v


def _text(v: Any) -> Any:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # run.name=123


def _folder_name(v: Any) -> Any:
    if isinstance(v, str) and (not v.strip() or v in (".", "..") or "/" in v or "\\" in v or v != v.strip()):
        raise ValueError("run.name must be a plain folder name inside run.dir (no '/', not '.' or '..', not empty)")
    # A name is also a table cell and a file name in the report (launch/report.py), a W&B run name and a log word.
    if isinstance(v, str) and (bad := sorted({c for c in v if c in "|`*[]<>\"" or not c.isprintable()})):
        raise ValueError(f"run.name may not hold {' '.join(map(repr, bad))} (they break the report's table and file names); "
                         "use letters, digits, '-', '_', '.'")
    return v


def _auto_or_bool(v: Any) -> Any:
    if v == "auto" or isinstance(v, bool):
        return v
    raise ValueError("expected auto, true or false")


def _no_is_false(v: Any) -> Any:
    return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false: train.mixed_precision=no


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Num = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]  # inf/nan (YAML .inf, 1e400) are never meant
Str = Annotated[str, BeforeValidator(_text), Strict()]
Precision = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(_no_is_false)]
AutoBool = Annotated[Literal["auto"] | bool, BeforeValidator(_auto_or_bool)]
_SECTION = ConfigDict(extra="forbid")


def _f(default: Any, doc: str, **rules: Any) -> Any:
    """A field with a one-line doc and optional pydantic rules (ge, le)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: type(default)(default), description=doc, **rules)
    return Field(default, description=doc, **rules)


@dataclass(config=_SECTION)
class RunConfig:
    name: Annotated[Str, AfterValidator(_folder_name)] = _f("debug", "Run name: the folder runs/NAME and the W&B run name.")
    dir: Str = _f("runs", "Parent folder of all run folders.")


@dataclass(config=_SECTION)
class DataConfig:
    shards: Str = _f("shards/fashion4", "Folder made by launch/pack.py (manifest.json + tar shards), or an http(s):// URL of one.")
    batch_size: Int = _f(256, "Global batch per optimizer step, split over ranks and accumulation.", ge=1)
    eval_batch_size: Int = _f(1024, "Per-rank batch for validation, test and figures.", ge=1)
    shuffle_buffer: Int = _f(8192, "Samples held by the shuffle buffer that mixes blocks.", ge=0)
    limit: Int = _f(0, "Use at most this many samples per split (0 = all); for debugging.", ge=0)
    normalize: Bool = _f(False, "Feed and reconstruct (x - 0.5) / 0.5 instead of [0, 1].")
    repeat: Int = _f(1, "Each training epoch holds every image this many times, shuffled together (a dataset expanded R-fold).", ge=1)
    repeat_clean: Int = _f(0, "Of those copies, the first N skip the corruption (repeat 6, repeat_clean 1: originals + 5 corrupted versions).", ge=0)
    on_error: Literal["raise", "skip"] = _f("raise", "A corrupt shard stops the run, or is skipped and counted.")
    pin_memory: Bool = _f(True, "Pin host batches before the device copy (only used with CUDA).")
    prefetch: AutoBool = _f("auto", "Read, pin and copy the next training batch on a thread during the step; auto = on with CUDA.")
    cache_dir: Str = _f("~/.cache/aedist/shards", "Local cache for shards read from a URL.")
    cache_max_gb: Num = _f(50.0, "Size bound of the URL shard cache; least recently used shards go first.", gt=0)


@dataclass(config=_SECTION)
class ModelConfig:
    name: Str = _f("conv_ae", "Registered model (aedist.models.MODELS): conv_ae, conv_vae, mlp_ae, mlp_vae.")
    in_channels: Int = _f(1, "Image channels; must match the shards.", ge=1)
    image_size: Int = _f(28, "Image height and width; must match the shards.", ge=4)
    latent_dim: Int = _f(2, "Latent size; 0 keeps a conv encoder's flattened feature map.", ge=0)
    channels: list[Int] = _f([32, 64, 128], "Conv channels per stage.")
    first_stride: Int = _f(2, "Stride of the first stage's conv (1 keeps full resolution).", ge=1, le=2)
    convs_per_stage: Int = _f(1, "Convs per stage: 1, or 2 with an extra stride-1 conv.", ge=1, le=2)
    hidden: list[Int] = _f([392], "Hidden widths of MLP models.")
    latent_act: Bool = _f(False, "ReLU on the latent and after the decoder's first linear.")
    output_act: Literal["sigmoid", "none"] = _f("sigmoid", "Output activation of the decoder.")
    dropout: Num = _f(0.0, "Dropout probability (Dropout2d in conv models).", ge=0.0, le=0.95)
    dropout_at: list[Int] = _f([], "Stage boundaries that get dropout; empty = after every layer.")
    batchnorm: Bool = _f(False, "BatchNorm after every hidden conv.")
    init: Literal["default", "xavier"] = _f("default", "Weight init; xavier = Xavier-uniform, bias 0.01.")
    params: dict[str, Any] = _f({}, "Options of a model registered with its own parameter schema.")


@dataclass(config=_SECTION)
class LossConfig:
    name: Str = _f("mse", "Registered reconstruction loss (aedist.losses.LOSSES): mse, l1, bce.")
    beta: Num = _f(1.0, "Weight of the KL term for VAEs.", ge=0.0)


@dataclass(config=_SECTION)
class ObjectiveConfig:
    name: Str = _f("reconstruction", "Registered objective (aedist.objectives.OBJECTIVES): reconstruction (the loss section), lpips_gan.")
    params: dict[str, Any] = _f({}, "Options of the objective's own parameter schema (see the README's latent-diffusion section).")


@dataclass(config=_SECTION)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = _f("adam", "Optimizer.")
    lr: Num = _f(1e-3, "Learning rate (never rescaled with the number of ranks).", ge=0.0)
    weight_decay: Num = _f(0.0, "Weight decay (L2 for adam/sgd, decoupled for adamw).", ge=0.0)
    momentum: Num = _f(0.0, "SGD momentum.", ge=0.0, le=1.0)
    scheduler: Literal["none", "plateau", "cosine"] = _f("none", "LR schedule: none, plateau (ReduceLROnPlateau; see plateau_on), cosine.")
    warmup_steps: Int = _f(0, "Linear warmup steps for the cosine schedule.", ge=0)
    plateau_factor: Num = _f(0.5, "ReduceLROnPlateau factor.", ge=0.0, le=1.0)
    plateau_patience: Int = _f(3, "ReduceLROnPlateau patience in epochs.", ge=0)
    plateau_on: Literal["val", "train"] = _f("val", "Loss ReduceLROnPlateau watches: val loss (every eval) or epoch-mean train loss.")
    grad_clip: Num = _f(0.0, "Clip the global grad norm to this (0 = off).", ge=0.0)
    fused: AutoBool = _f("auto", "Fused optimizer kernels (CUDA and CPU); auto = on: they skip a non-finite step on the device, with no host sync.")


@dataclass(config=_SECTION)
class TrainConfig:
    epochs: Int = _f(10, "Epochs to train.", ge=1)
    max_steps: Int = _f(0, "Stop after this many optimizer steps (0 = run all epochs).", ge=0)
    seed: Int = _f(0, "RNG seed for weights, shuffling and corruption draws.", ge=0)
    grad_accum: Int = _f(1, "Gradient accumulation steps per optimizer step.", ge=1)
    mixed_precision: Precision = _f("auto", "Autocast precision; auto = bf16 where the device runs it natively, else no.")
    channels_last: AutoBool = _f("auto", "channels_last memory format; auto = on for conv models on CPU (any precision) and on CUDA under bf16/fp16.")
    compile: AutoBool = _f("auto", "torch.compile the step; auto = on for CUDA runs of 2000+ steps (CUDA graphs), off on CPU, for --debug and short runs.")
    cpu: Bool = _f(False, "Force CPU even where CUDA is present.")
    checkpoint_every: Int = _f(0, "Checkpoint every N optimizer steps (0 = at each epoch end).", ge=0)
    keep_last: Int = _f(2, "Complete step checkpoints to keep (best is kept apart).", ge=1)
    resume: Str = _f("auto", "auto = newest complete checkpoint of this run, never, or a checkpoint path.")
    early_stop_patience: Int = _f(0, "Stop after N epochs without a better val loss (0 = off).", ge=0)
    max_bad_steps: Int = _f(0, "Skip up to N non-finite-loss steps before stopping (0 = stop on the first).", ge=0)
    collective_timeout_s: Num = _f(600.0, "Seconds a rank waits for the others at a collective before the job ends (exit 124; README: Exit codes).", gt=0)
    eval_every: Int = _f(1, "Validate and test every N epochs.", ge=1)
    test_every: Int = _f(1, "Of those evaluations, run the test pass (and its kNN) only every N epochs and after the last; validation keeps eval_every.", ge=1)
    sync_every: Int = _f(0, "Host-device sync every N steps (0 = at log.every): skipped non-finite steps and stop signals are read there.", ge=0)
    preempt_signal: Literal["USR1", "USR2", "TERM"] = _f("USR1", "Signal that means 'save and exit 75' (SIGTERM always does); USR2 where NCCL takes USR1.")
    ema_decay: Num = _f(0.0, "EMA of the weights, updated every optimizer step (e.g. 0.999; 0 = off); evaluated as val_ema/, test_ema/.", ge=0.0, lt=1.0)


@dataclass(config=_SECTION)
class LogConfig:
    wandb: Literal["online", "offline", "disabled"] = _f("offline", "W&B mode; offline runs sync later with `wandb sync`.")
    project: Str = _f("aedist", "W&B project.")
    entity: Str | None = _f(None, "W&B entity (team or user).")
    group: Str | None = _f(None, "W&B group, e.g. one per sweep or study.")
    tags: list[Str] = _f([], "W&B tags.")
    tensorboard: Bool = _f(False, "Also log to TensorBoard (runs/NAME/PROJECT/): scalars, figures as images, the resolved config as text.")
    wandb_artifacts: Literal["none", "best", "last", "both"] = _f("none", "Checkpoints logged as versions of the W&B model artifact NAME-model: best, last, both, none.")
    every: Int = _f(10, "Log step metrics every N optimizer steps.", ge=1)
    figures_every: Int = _f(1, "Draw figures every N epochs (and always after the last).", ge=1)
    probe_size: Int = _f(64, "Test images in the fixed probe set for figures.", ge=8)


@dataclass(config=_SECTION)
class EvalConfig:
    corruptions: dict[str, list[Any]] = _f({}, "Named test-time corruption lists, e.g. {rotated: [{rotate: {max_degrees: 180}}]}.")
    knn_k: Int = _f(5, "Neighbours for the latent kNN class accuracy.", ge=1)
    knn_train: Int = _f(5000, "Train samples whose latents fit the kNN classifier.", ge=10)
    metrics: list[Str] = _f(["mse", "psnr_db", "snr_db", "variety"], "Metrics of every evaluated set: mse psnr_db snr_db ssim ms_ssim lpips rfid kl_channel variety "
                            "active_units (README: Image quality metrics).")
    lpips_net: Literal["alex", "vgg"] = _f("alex", "LPIPS trunk; its torchvision weights must be in TORCH_HOME (launch/fetch_weights.py).")


@dataclass(config=_SECTION)
class Config:
    imports: list[Str] = _f([], "Extensions imported before names are checked: modules (my_project.aeparts) or .py files (./aeparts.py, "
                            "from the current folder); config.yaml records them resolved.")
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    corruption: list[Any] = _f([], "Ordered training corruptions (registry: aedist.data.corruption.CORRUPTIONS).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        """The run folder ``run.dir/run.name``."""
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), with a password in data.shards masked: it is what config.yaml,
        W&B and the resume check see, and a secret must reach none of them (remote.mask_url)."""
        from aedist.data.remote import mask_url  # here: aedist.data imports torch

        d = dataclasses.asdict(self)
        d["data"]["shards"] = mask_url(d["data"]["shards"])
        return d

    def model_hash(self) -> str:
        """Hash of everything that fixes the shape of the weights; checkpoints must match it."""
        model = dataclasses.asdict(self.model)
        if not model["params"]:  # runs from before model.params existed keep their hash
            del model["params"]
        return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("corruption", "imports")}
_ADAPTER = TypeAdapter(Config)


# ----------------------------------------------------------------------------- errors


def _known(path: tuple[Any, ...]) -> list[str]:
    """Field names of the section at ``path`` (empty when it is not a section)."""
    cls: Any = Config
    for part in path:
        fields = getattr(cls, "__pydantic_fields__", {})
        if part not in fields:
            return []
        cls = fields[part].annotation
    return list(getattr(cls, "__pydantic_fields__", {}))


def _one_line(err: ValidationError) -> UserError:
    """pydantic's first complaint as one line: key, value, what is allowed, the closest valid name."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(map(str, loc))
    if e["type"] == "unexpected_keyword_argument":
        known = _known(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'?" if close else ""
        return UserError(f"unknown config key '{key}'{hint} (known: {', '.join(known)})")
    if e["type"] in ("dataclass_type", "dataclass_args_type"):
        return UserError(f"config key '{key}': bad value {e['input']!r}; expected a section with keys {', '.join(_known(loc))}")
    allowed = {
        "literal_error": lambda: "allowed: " + e["ctx"]["expected"].replace("'", "").replace(" or ", ", "),
        "greater_than_equal": lambda: f"must be >= {e['ctx']['ge']}",
        "greater_than": lambda: f"must be > {e['ctx']['gt']}",
        "less_than_equal": lambda: f"must be <= {e['ctx']['le']}",
        "less_than": lambda: f"must be < {e['ctx']['lt']}",
        "finite_number": lambda: "must be a finite number",
        "int_type": lambda: "expected an integer",
        "int_from_float": lambda: "expected an integer",
        "bool_type": lambda: "expected true or false",
        "string_type": lambda: "expected a string",
        "list_type": lambda: "expected a list, e.g. [1, 2]",
        "dict_type": lambda: "expected a mapping, e.g. {name: value}",
        "value_error": lambda: str(e["ctx"]["error"]),
    }.get(e["type"], lambda: e["msg"])()
    if e["type"] == "literal_error":
        choices = [c.strip() for c in allowed.removeprefix("allowed: ").split(",")]
        close = difflib.get_close_matches(str(e["input"]), choices, n=1)
        allowed += f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"config key '{key}': bad value {e['input']!r}; {allowed}")


# ----------------------------------------------------------------------------- loading


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "corruptions":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}``; the value is read as YAML. A whole
    section replaced by a scalar (``train=3``) is refused: it would silently drop the YAML's keys."""
    if "=" not in item:
        raise UserError(f"bad override '{item}': write key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except DuplicateKeyError as err:
        raise UserError(f"bad override '{item}': {err.problem}") from None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] in SECTIONS and not isinstance(value, dict):
        raise UserError(f"bad override '{item}': '{parts[0]}' is a section; override one of its keys, "
                        f"e.g. {parts[0]}.{_known((parts[0],))[0]}=...")
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (a YAML file's content, a run's config.yaml) into a :class:`Config`: types
    and ranges; registered names are checked by :func:`aedist.loading.load_run_config`."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise _one_line(err) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides, validated (types and ranges;
    :func:`aedist.loading.load_config` also imports the extensions and checks registered names)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, "config file")
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    return config_from_dict(data)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping (at any nesting level) names the same key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping. Plain PyYAML keeps the last
    one silently, so a second ``train:`` section would drop the first one's keys without a word. Keys
    brought in by a ``<<: *anchor`` merge may still be overridden: that is what merges are for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:  # explicit keys only: flatten_mapping (in super) adds the merged ones
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: super() reports it
                    break
                if first is not None:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} on lines {first} and {line}", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`UniqueKeyLoader`); raises yaml.YAMLError."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line UserError saying what is wrong with the file
    (including a key written twice in one mapping, naming both lines)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} not found; pass an existing file such as configs/debug.yaml")
    try:
        data = load_yaml_text(p.read_text()) or {}
    except DuplicateKeyError as err:
        raise UserError(f"{what} {str(p)!r}: {err.problem}; keep one of them (PyYAML would silently keep only the last)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {str(p)!r} is not valid YAML ({str(err).splitlines()[0]}); fix or restore it") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(p)!r} must hold a mapping of sections")
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (kept in the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, info in Config.__pydantic_fields__.items():
        section = info.annotation
        if not hasattr(section, "__pydantic_fields__"):
            rows.append(f"| `{name}` | `[]` | {info.description} |")
            continue
        for key, f in section.__pydantic_fields__.items():
            default = f.get_default(call_default_factory=True)
            rows.append(f"| `{name}.{key}` | `{json.dumps(default)}` | {f.description} |")
    return "\n".join(rows)


def _main(argv: list[str]) -> int:
    """``python -m aedist.config`` prints the reference; ``--run-dir CONFIG [k=v ...] [--import X ...]`` prints a run folder."""
    if argv[:1] == ["--run-dir"] and len(argv) >= 2:
        # slurm/train.sbatch passes train.py's arguments; `--import X` does not change the run folder.
        rest, skip = [], False
        for arg in argv[2:]:
            if skip or arg.startswith("--import="):
                skip = False
                continue
            skip = arg == "--import"
            if not skip:
                rest.append(arg)
        print(load_config(argv[1], rest).run_dir)
    else:
        sys.stdout.write(reference_markdown() + "\n")
    return 0


if __name__ == "__main__":
    from aedist.errors import run_cli

    run_cli(_main)
