#!/usr/bin/env bash
# Build (or find cached) default guest; prints the vmlinux, initramfs and rootfs paths.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m guest.build "$@"
