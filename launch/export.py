"""Export a trained run: ``python launch/export.py runs/NAME --format safetensors|diffusers --out DIR``.

    python launch/export.py runs/photos --format safetensors --out exported/photos   # any model
    python launch/export.py runs/kl_f4 --format diffusers --out exported/kl_f4       # model.name=diffusers_kl
    python launch/export.py runs/kl_f4 --format diffusers --out DIR --weights raw --checkpoint step-6

safetensors: model.safetensors + the run's config.yaml (rebuild with
``build_model(config_from_dict(read_yaml("DIR/config.yaml", "config")).model)`` then ``load_file``).
diffusers: an AutoencoderKL ``save_pretrained`` folder, read by ``AutoencoderKL.from_pretrained(DIR)``
and by aedist's ``model: {name: diffusers_kl, params: {pretrained: DIR}}``.
Both write a README.md model card: the run's metrics (eval.json, else summary.json) and its training command.
The extensions the run imported (``imports`` in its config.yaml) are imported again; --import adds more.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aedist.errors import run_cli
from aedist.export import FORMATS


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder made by launch/train.py, e.g. runs/NAME")
    parser.add_argument("--format", required=True, choices=FORMATS, help="safetensors (any model) or diffusers (diffusers_kl)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder name, e.g. best or step-N (default: newest usable)")
    parser.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"], help="auto = EMA weights where the run kept them")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="also import this module or .py file (the run's recorded imports are always imported); repeatable")
    args = parser.parse_args(argv)

    from aedist.export import export_run

    out = export_run(args.run_dir, args.out, args.format, weights=args.weights, checkpoint=args.checkpoint, imports=args.imports)
    print(f"wrote {out} ({args.format}; model card {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
