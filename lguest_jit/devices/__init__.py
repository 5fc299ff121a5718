"""The lguest devices: console, block, network, rng and vsock, each virtqueue served
by its own thread running nogil kernels.  See base.py for the lifecycle.

``DEVICES`` is the registry: one line per device, its kind (the name a
machine description and a snapshot use) and where its class lives.  The
class declares the rest (``base.Device``): PCI class, queue sizes and other
defaults, how it is built from its options, and its saved state.

Device modules load on first use (they bring Numba); ``tunspec`` and
``knobs`` are light, so the CLI checks its options before it loads the
engine."""
import importlib

DEVICES = {
    "console": "console.Console",
    "block": "block.Block",
    "net": "net.Net",
    "rng": "rng.Rng",
    "vsock": "vsock.Vsock",
}

_WHERE = {
    "Device": "base", "DeviceEnv": "base", "error_message": "base", "Block": "block", "Console": "console",
    "raw_terminal": "console", "Net": "net", "TunSpec": "tunspec", "parse_tunnet": "tunspec", "Rng": "rng",
    "Vsock": "vsock",
}


def device_class(kind: str):
    """The class of registered device ``kind`` (its module loaded now)."""
    module, _, name = DEVICES[kind].partition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
