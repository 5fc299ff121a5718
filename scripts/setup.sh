#!/usr/bin/env bash
# Installs lguest-jit and its test dependencies into the current Python
# (once; again when pyproject.toml changes: see scripts/install.sh).
set -euo pipefail
exec bash "$(dirname "$0")/install.sh" --test
