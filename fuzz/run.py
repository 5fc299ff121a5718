"""``python -m fuzz.run TARGET [libFuzzer flags] [CORPUS...]``: fuzz one
target with atheris.  The target module (and, in pure-Python mode, all of
lguest_jit) is imported here, inside atheris's instrumentation, which is why
this runner exists: a target run as ``__main__`` would have imported the
launcher before instrumentation began."""
import sys

from .common import fuzz

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m fuzz.run TARGET [libFuzzer flags] [CORPUS...]")
    fuzz(f"fuzz.fuzz_{sys.argv[1]}", sys.argv[2:])
