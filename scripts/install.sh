#!/usr/bin/env bash
# Installs lguest-jit (editable, from this checkout) into the current Python,
# once: again only when pyproject.toml changed, the Python changed, or the
# installed lguest-jit is another checkout's.
#   bash scripts/install.sh          what `lguest-jit` needs to run guests
#   bash scripts/install.sh --test   that and the test extras (scripts/setup.sh)
# pip's output goes to a log in the cache dir; on failure one line says
# what failed and where the log is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd -P)"
python="${PYTHON:-python3}"
case "${1:-}" in
    "") what="main"; spec="$root" ;;
    --test) what="test"; spec="$root[test]" ;;
    *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

cache="${LGUEST_JIT_CACHE:-$HOME/.cache/lguest-jit}"
mkdir -p "$cache" 2>/dev/null || cache="$(mktemp -d)"
log="$cache/install.log"
# What an install depends on: the project's metadata, where it lives, and
# which interpreter it went into.
key="$( { sha256sum < "$root/pyproject.toml"; echo "$root"; command -v "$python"; } | sha256sum | cut -c1-32)"

installed_here() {
    # The installed distribution must point at this checkout: another
    # `pip install -e` elsewhere repoints the `lguest-jit` command.  Run from
    # / and without PYTHONPATH, so no checkout's own files (its egg-info)
    # answer for the installed ones.
    (cd / && env -u PYTHONPATH "$python" - "$root" <<'EOF'
import json, sys
from importlib import metadata
from urllib.parse import unquote
try:
    url = json.loads(metadata.distribution("lguest-jit").read_text("direct_url.json") or "{}").get("url", "")
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if unquote(url) == "file://" + sys.argv[1] else 1)
EOF
    ) 2>/dev/null
}

# The test install covers the main one: either stamp will do for `main`.
# Bytecode for the package, written even where PYTHONDONTWRITEBYTECODE is
# set: without it every start compiles ~25 modules from source (~0.1 s of
# exec -> first KVM_RUN).  Only changed files are rewritten.
"$python" -m compileall -q "$root/lguest_jit" > /dev/null 2>&1 || true

stamps=("$cache/install-$what.stamp")
[ "$what" = main ] && stamps+=("$cache/install-test.stamp")
for stamp in "${stamps[@]}"; do
    if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && installed_here; then
        exit 0
    fi
done

echo "$python -m pip install -e $spec  ($(date -u '+%F %T UTC'))" > "$log"
if ! "$python" -m pip install --disable-pip-version-check -e "$spec" >> "$log" 2>&1; then
    why="$(grep -v '^\s*$' "$log" | tail -n1 | sed 's/^ERROR: //' | cut -c1-160)"
    echo "lguest-jit: installing $spec with $python failed${why:+ ($why)}; see $log" >&2
    exit 1
fi
echo "$key" > "$cache/install-$what.stamp"
