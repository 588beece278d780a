"""Export a trained diffusers_kl run as a diffusers ``save_pretrained`` folder (config.json + safetensors).

    python launch/export.py runs/kl_f4 exported/kl_f4 [--checkpoint best] [--weights auto|ema|raw]
    # then, anywhere: diffusers.AutoencoderKL.from_pretrained("exported/kl_f4"), or in aedist:
    #   model: {name: diffusers_kl, params: {pretrained: exported/kl_f4}}
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from aedist.errors import UserError, run_cli


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder made by launch/train.py with model.name=diffusers_kl")
    parser.add_argument("out", help="folder to write (must not exist, or be empty)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: newest complete step-N)")
    parser.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"], help="auto = EMA weights where the run kept them")
    args = parser.parse_args(argv)

    from aedist.checkpoint import newest_checkpoint, read_matching_state
    from aedist.config import config_from_dict, read_yaml
    from aedist.evaluation.run import load_weights
    from aedist.models.diffusers_kl import export_pretrained

    run, out = Path(args.run_dir), Path(args.out)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass runs/NAME as made by launch/train.py")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass a new folder")
    cfg = config_from_dict(read_yaml(run / "config.yaml", "run config"))
    folder = run / "checkpoints" / args.checkpoint if args.checkpoint else newest_checkpoint(run / "checkpoints")
    if folder is None or not (folder / "COMPLETE").exists():
        raise UserError(f"{run} has no complete checkpoint{' ' + args.checkpoint if args.checkpoint else ''}; train it first")
    read_matching_state(folder, cfg.model_hash(), fix=f"it does not belong to {run}/config.yaml")
    model, ema = load_weights(cfg, folder, args.weights, "cpu")
    export_pretrained(model, out)
    print(f"wrote {out} ({'EMA' if ema else 'raw'} weights of {folder})")
    return 0


if __name__ == "__main__":
    run_cli(main)
