import os

import pytest


def pytest_report_header(config):
    return f"NUMBA_DISABLE_JIT={os.environ.get('NUMBA_DISABLE_JIT', '0')}"


@pytest.fixture
def guest_memory():
    from lguest_jit.hw.memory import GuestMemory
    gm = GuestMemory(4 << 20)
    yield gm
    gm.close()
