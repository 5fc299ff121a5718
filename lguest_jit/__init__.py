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


def _use_source_keyed_cache() -> None:
    """Numba's on-disk cache checks only each function's own file, so a
    kernel that inlined a helper from another module stays stale after that
    module changes (a stale ``_wait_chain`` inside the block kernel hung a
    device).  Keying the cache directory on every source file of the package
    makes any edit recompile everything.  NUMBA_CACHE_DIR set by the user
    wins.  Numba is not imported here (the CLI answers --help without it):
    it reads the variable when it is first imported."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    base = Path(os.environ.get("LGUEST_JIT_CACHE", Path.home() / ".cache" / "lguest-jit"))
    cache = base / "numba" / SOURCE_DIGEST[:16]
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return      # read-only home: Numba falls back to its own locations
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
