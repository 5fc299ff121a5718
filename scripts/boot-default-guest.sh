#!/usr/bin/env bash
# The main job (README): build the default guest once (cached per kernel
# config) and boot it under lguest-jit with its console on this terminal.
#   bash scripts/boot-default-guest.sh [--initramfs] [--fresh-root] [--print] [WORKLOAD]
#   (WORKLOAD: selftest | shell | boot | persist; default selftest)
# It boots from the root-disk image (root=/dev/vda, your own copy of it, so
# writes persist), with rng and a scratch disk (vdb) the selftest writes to;
# --initramfs boots the initramfs instead.  guest/run.py does the work.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh      # once; again only when pyproject.toml changes
exec python3 -m guest.run "$@"
