"""Export a trained run's weights for use outside aedist: ``python launch/export.py runs/NAME --format F --out DIR``.

    export_run("runs/photos", "exported/photos", "safetensors")   # any model: model.safetensors + config.yaml
    export_run("runs/kl_f4", "exported/kl_f4", "diffusers")       # diffusers_kl only: AutoencoderKL.save_pretrained

Both formats get a model card (README.md) with the run's metrics (eval.json, else summary.json) and
the commands that trained it (command.txt). A ``safetensors`` export is rebuilt with::

    from safetensors.torch import load_file
    from aedist.loading import load_run_config
    from aedist.models import build_model
    model = build_model(load_run_config("DIR").model)   # imports the extensions config.yaml records, if any
    model.load_state_dict(load_file("DIR/model.safetensors")); model.eval()
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from aedist.config import Config
from aedist.errors import UserError

FORMATS = ("safetensors", "diffusers")


def export_run(run_dir: str | Path, out: str | Path, fmt: str, *, weights: str = "auto", checkpoint: str | None = None,
               imports: Sequence[str] = ()) -> Path:
    """Write ``out`` (new or empty) in format ``fmt`` from a run's checkpoint (``checkpoint``, else the
    newest usable one); ``weights``: auto = EMA where the run kept it, ema (insists) or raw. The run's
    recorded extensions (and ``imports``, ``--import``) are imported to rebuild its model. Returns ``out``."""
    from aedist.evaluation.run import load_checkpoint_weights
    from aedist.loading import load_run_config

    run, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass runs/NAME as made by launch/train.py")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pass a new folder")
    cfg = load_run_config(run, imports)
    if fmt == "diffusers" and cfg.model.name != "diffusers_kl":  # before minutes of loading: the format cannot hold it
        raise UserError(f"--format diffusers needs a model.name=diffusers_kl run, and {run} is {cfg.model.name}; use --format safetensors")
    warn = lambda line: print(line, file=sys.stderr)  # noqa: E731 - a damaged newest checkpoint is skipped with one line
    state, model, ema, folder = load_checkpoint_weights(cfg, run, checkpoint, weights, "cpu", warn)
    if fmt == "diffusers":
        from aedist.models.diffusers_kl import export_pretrained

        export_pretrained(model, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        # Cloned and contiguous: safetensors refuses tensors that share storage (tied or viewed weights).
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        shutil.copyfile(run / "config.yaml", out / "config.yaml")  # its model section rebuilds the network
    (out / "README.md").write_text(model_card(run, cfg, fmt, "ema" if ema else "raw", folder, state.step))
    return out


def run_metrics(run: Path) -> tuple[str, dict[str, float]]:
    """(file name, {metric: value}) of a run's numbers: eval.json (launch/evaluate.py), else summary.json's
    ``split/metric`` entries (the last evaluation during training), else ("", {})."""
    for name in ("eval.json", "summary.json"):
        try:
            data: dict[str, Any] = json.loads((run / name).read_text())
        except (OSError, ValueError):
            continue
        keep = {k: v for k, v in data.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return name, keep
    return "", {}


def model_card(run: Path, cfg: Config, fmt: str, weights: str, folder: Path, step: int) -> str:
    """The README.md of an export: what the model is, how to load it, its metrics and how it was trained."""
    m = cfg.model
    source, values = run_metrics(run)
    commands = (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else "(no command.txt in the run folder)"
    if fmt == "diffusers":
        load = "from diffusers import AutoencoderKL\nvae = AutoencoderKL.from_pretrained(\"DIR\")"
    else:
        load = ("from safetensors.torch import load_file\nfrom aedist.loading import load_run_config\n"
                "from aedist.models import build_model\n"
                "model = build_model(load_run_config(\"DIR\").model)  # imports the extensions config.yaml records\n"
                "model.load_state_dict(load_file(\"DIR/model.safetensors\"))\nmodel.eval()")
    lines = [
        f"# {run.name}",
        "",
        f"An aedist `{m.name}` autoencoder for {m.in_channels}x{m.image_size}x{m.image_size} images, exported as `{fmt}` "
        f"({weights} weights of checkpoint `{folder.name}`, step {step}).",
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
        "",
        f"## Metrics ({source or 'none recorded'})",
        "",
    ]
    if values:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in values.items())]
    else:
        lines.append("No eval.json or summary.json in the run folder: run `python launch/evaluate.py RUN` and export again.")
    lines += ["", "## Trained with", "", "```bash", commands, "```", ""]
    return "\n".join(lines)
