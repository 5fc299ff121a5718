"""Loading cached kernels without paying for Numba's whole start-up.

Before every cache load Numba refreshes its CPU target, and the first
refresh imports and registers every implementation Numba has (linear
algebra, typed containers, random generators, datetime, ...): 0.3-0.4 s of
each launcher start on our hosts, more than half of exec -> first KVM_RUN.
Rebuilding a kernel from the disk cache needs none of that: its object code
is linked as it is, and only the runtime (NRT) must be up.  A compile does
need the registries, so a load that misses refreshes first, exactly as
Numba would have, and so does a load that fails for any reason.

``install()`` is idempotent and leaves Numba untouched when its cache class
is not the shape this was written against (numba 0.60-0.68).
"""
from __future__ import annotations

_MARK = "_lguest_jit_light_load"


def install() -> bool:
    """Make cache loads skip the target refresh; True when in effect."""
    from numba.core import caching
    from numba.core.runtime import rtsys

    cache = caching.Cache
    original = cache.load_overload
    if getattr(original, _MARK, False):
        return True
    if not (hasattr(cache, "_load_overload") and hasattr(cache, "_guard_against_spurious_io_errors")
            and hasattr(rtsys, "initialize")):
        return False

    def load_overload(self, sig, target_context):
        try:
            rtsys.initialize(target_context)     # what a rebuilt kernel links against
            with self._guard_against_spurious_io_errors():
                data = self._load_overload(sig, target_context)
        except Exception:                         # noqa: BLE001 - Numba's own path decides
            data = None
        if data is None:
            # A miss: Numba compiles next, which needs every registry.
            return original(self, sig, target_context)
        return data

    setattr(load_overload, _MARK, True)
    load_overload.__doc__ = original.__doc__
    cache.load_overload = load_overload
    return True
