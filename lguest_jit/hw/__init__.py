"""Hardware layer: guest memory, hypervisor backends, kernel loading, x86 decode."""

_MEMORY_NAMES = ("GuestMemory", "PAGE_SIZE", "check_range", "in_ram")


def __getattr__(name):
    # Loaded on first use: `memory` brings Numba, and the CLI reads small
    # modules of this package (hosts) before it knows it will run a guest.
    if name in _MEMORY_NAMES:
        from . import memory
        return getattr(memory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
