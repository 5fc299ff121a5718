#!/usr/bin/env bash
# Installs lguest-jit and its test dependencies into the current Python
# (once; again when pyproject.toml changes: see scripts/install.sh), and the
# Debian tools tests check our output with (GNU cpio reads the initramfs we
# write), through the guest build's apt-get step: nothing when installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd -P)"
TEST_APT_PACKAGES="cpio"
(cd "$root" && python3 - $TEST_APT_PACKAGES <<'PY'
import sys
from guest.build import ensure_packages
try:
    ensure_packages(tuple(sys.argv[1:]), log=lambda m: print(m, file=sys.stderr))
except RuntimeError as e:      # not root, no apt: the tests that need them skip
    print(f"lguest-jit: {e}; tests that need them will skip", file=sys.stderr)
PY
)
exec bash "$root/scripts/install.sh" --test
