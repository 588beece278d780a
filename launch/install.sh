#!/usr/bin/env bash
# Install aedist (pip, editable, with the dev extra) and, where apt-get runs as root, the Debian
# packages it uses: real Fashion-MNIST, and with --with-slurm the one-node SLURM cluster the tests start.
# Safe to run again: installed packages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(dataset-fashion-mnist)
[[ "${1:-}" == "--with-slurm" ]] && pkgs+=(slurmctld slurmd slurm-client munge iproute2)  # iproute2: the two-node test network
if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
else
  echo "note: no root apt-get; Fashion-MNIST will come from torchvision's download" >&2
fi
python -m pip install -q --disable-pip-version-check -e ".[dev]"
