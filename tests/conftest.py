import os

import pytest


def pytest_report_header(config):
    return f"NUMBA_DISABLE_JIT={os.environ.get('NUMBA_DISABLE_JIT', '0')}"


@pytest.fixture
def gm():
    """4 MiB of guest memory."""
    from lguest_jit.hw.memory import GuestMemory
    m = GuestMemory(4 << 20)
    yield m
    m.close()


@pytest.fixture
def machine():
    """(guest memory, PCI bus) for device tests without a hypervisor."""
    from lguest_jit import pci
    from lguest_jit.hw.memory import GuestMemory
    gm = GuestMemory(32 << 20)
    bus = pci.Bus(gm)
    yield gm, bus
    bus.close()
    gm.close()
