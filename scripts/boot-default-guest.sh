#!/usr/bin/env bash
# The main job (README): build the default guest once (cached per kernel
# config) and boot it under lguest-jit with its console on this terminal.
#   bash scripts/boot-default-guest.sh [WORKLOAD]     (selftest | shell | boot; default selftest)
# Devices: console (hvc0), rng, and a scratch disk the selftest writes to.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh      # once; again only when pyproject.toml changes
workload="${1:-selftest}"
read -r vmlinux initrd < <(python3 -m guest.build --json | python3 -c '
import json, sys; g = json.load(sys.stdin); print(g["vmlinux"], g["initramfs"])')
cmdline="$(python3 -c 'import sys; from guest.build import default_cmdline; print(default_cmdline(sys.argv[1], "hvc0"))' "$workload")"
disk="${LGUEST_JIT_CACHE:-$HOME/.cache/lguest-jit}/default-guest-disk.img"
mkdir -p "$(dirname "$disk")"
[ -f "$disk" ] || truncate -s 64M "$disk"
exec lguest-jit --rng --block="$disk" --initrd="$initrd" 256 "$vmlinux" $cmdline
