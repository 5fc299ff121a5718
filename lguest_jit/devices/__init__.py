"""The lguest devices: console, block, network and rng, each virtqueue served
by its own thread running nogil kernels.  See base.py for the lifecycle.

Device modules load on first use (they bring Numba); ``tunspec`` is light,
so the CLI can check ``--tunnet`` before it loads the engine."""
import importlib

_WHERE = {
    "Device": "base", "error_message": "base", "Block": "block", "Console": "console",
    "raw_terminal": "console", "Net": "net", "TunSpec": "tunspec", "parse_tunnet": "tunspec", "Rng": "rng",
}


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
