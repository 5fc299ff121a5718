"""Which hypervisors this host offers, answered without importing Numba or
numpy: the CLI asks before it loads the engine (``--help`` and argument
errors must stay fast)."""
from __future__ import annotations

import os

LGUEST_DEVICE = "/dev/lguest"


def lguest_available(dev: str = LGUEST_DEVICE) -> bool:
    """True when this host has the lguest device (no current kernel does)."""
    return os.path.exists(dev)
