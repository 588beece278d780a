"""Download the pretrained weights of the perceptual metrics into torch.hub's folder, for machines
(cluster nodes) that have no network: run it where there is network, then copy the folder over.

    python launch/fetch_weights.py --metrics lpips rfid --lpips-net alex
    rsync -a ~/.cache/torch/hub/checkpoints/ cluster:~/.cache/torch/hub/checkpoints/   # or: TORCH_HOME=/shared/torch on both

Files land in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``): torchvision's
AlexNet (alexnet-owt-7be5be79.pth) or VGG16 (vgg16-397923af.pth) for lpips, pytorch-fid's Inception
(pt_inception-2015-12-05-6726825d.pth) for rfid. Files already there are kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aedist.errors import run_cli


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="+", default=["lpips", "rfid"], choices=["lpips", "rfid"], help="metrics whose weights to fetch")
    parser.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"], help="LPIPS trunk (eval.lpips_net)")
    args = parser.parse_args(argv)

    from aedist.evaluation.backbones import fetch_backbones, weights_dir

    for path in fetch_backbones(args.metrics, lpips_net=args.lpips_net):
        print(f"ok {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    print(f"copy {weights_dir()} to the same place on the offline machine (or set TORCH_HOME there to a copy of {weights_dir().parents[1]})")
    return 0


if __name__ == "__main__":
    run_cli(main)
