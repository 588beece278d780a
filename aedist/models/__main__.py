"""``python -m aedist.models CONFIG.yaml [key=value ...] [--import X ...]``: the model of a config and its parameter counts.

Here, not in ``aedist.models``: loading a config with its extensions (:mod:`aedist.loading`) needs the
registries, and the registries must not need the loader.
"""

from __future__ import annotations

from collections.abc import Sequence

from aedist.errors import UserError, run_cli
from aedist.loading import load_config
from aedist.models import build_model, count_params


def main(argv: Sequence[str]) -> int:
    """Print the model of a config and its encoder / decoder / total parameter counts."""
    args, imports = list(argv), []
    while "--import" in args:  # a few positional words: argparse would only add a usage line
        i = args.index("--import")
        if i + 1 >= len(args):
            raise UserError("--import needs a module or a .py file")
        imports.append(args[i + 1])
        del args[i:i + 2]
    if not args:
        raise UserError("usage: python -m aedist.models CONFIG.yaml [key=value ...] [--import MODULE_OR_FILE]")
    model = build_model(load_config(args[0], args[1:], imports).model)
    print(model)
    parts = getattr(model, "vae", model)  # diffusers_kl keeps diffusers' encoder/decoder inside .vae
    print(f"encoder params: {count_params(parts.encoder)}")
    print(f"decoder params: {count_params(parts.decoder)}")
    print(f"total params: {count_params(model)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
