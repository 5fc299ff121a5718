"""lguest-jit: the lguest launcher in Python, hot paths compiled with Numba."""
import hashlib
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _source_digest() -> str:
    """sha256 over every source file of the package (names and contents)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(here.rglob("*.py")):
        digest.update(str(path.relative_to(here)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# The Numba cache directory's key, and what a warm launcher (warm.py) must
# share with its clients.
SOURCE_DIGEST = _source_digest()


# Why the kernel cache directory cannot be trusted (one line), or None: the
# CLI refuses to run with it (main.py); set below, at import, before Numba.
CACHE_PROBLEM: str | None = None


def _use_source_keyed_cache() -> None:
    """Numba's on-disk cache checks only each function's own file, so a
    kernel that inlined a helper from another module stays stale after that
    module changes (a stale ``_wait_chain`` inside the block kernel hung a
    device).  Keying the cache directory on every source file of the package
    makes any edit recompile everything.  NUMBA_CACHE_DIR set by the user
    wins.  Numba is not imported here (the CLI answers --help without it):
    it reads the variable when it is first imported.

    Numba unpickles what it finds there, so a directory another user can
    write (or owns), or one under such a directory, would run that user's
    code as us: it is refused (CACHE_PROBLEM) and not handed to Numba."""
    global CACHE_PROBLEM
    from .hw.pathtrust import path_problem
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        why = path_problem(given)
        if why is not None:
            CACHE_PROBLEM = f"the kernel cache NUMBA_CACHE_DIR={given} is not safe to load code from: {why}"
        return
    base = Path(os.environ.get("LGUEST_JIT_CACHE", Path.home() / ".cache" / "lguest-jit"))
    cache = base / "numba" / SOURCE_DIGEST[:16]
    why = path_problem(str(cache))                  # before creating anything under it
    if why is None:
        old = os.umask(0o077)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            return      # read-only home: Numba falls back to its own locations
        finally:
            os.umask(old)
        why = path_problem(str(cache))
    if why is not None:
        CACHE_PROBLEM = f"the kernel cache {cache} is not safe to load code from: {why}"
        return
    os.environ["NUMBA_CACHE_DIR"] = str(cache)
    config = sys.modules.get("numba.core.config")
    if config is not None:      # Numba came first: it has read its environment already
        config.CACHE_DIR = str(cache)


_use_source_keyed_cache()


def keep_scipy_out() -> None:
    """Numba imports SciPy, where installed, only to look for a BLAS for
    np.dot; no kernel here does linear algebra, and the import costs 0.5 s
    or more of every start (measured: README, "Snapshots").  The process
    that runs a guest (and the warm launcher it forks from) never needs
    SciPy, so it is kept out of it."""
    if "scipy" not in sys.modules:
        sys.modules["scipy"] = None        # import scipy -> ImportError: Numba skips its BLAS check
