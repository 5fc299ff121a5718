"""Hardware layer: guest memory, hypervisor backends, kernel loading, x86 decode."""
from .memory import GuestMemory, PAGE_SIZE, check_range, in_ram  # noqa: F401
