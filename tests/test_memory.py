"""Guest memory: guard pages, bounds checks, and the load/store helpers in
both compiled and pure-Python form."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from lguest_jit.hw import memory
from lguest_jit.hw.memory import PAGE_SIZE, GuestMemory, check_range, in_ram


@pytest.mark.parametrize("where", ["gm.base - 1", "gm.base + gm.size"])
def test_guard_pages_fault(where):
    # A stray access one byte before or after guest RAM must kill the process.
    code = ("import ctypes; from lguest_jit.hw.memory import GuestMemory; gm = GuestMemory(1 << 16); "
            f"ctypes.c_uint8.from_address({where}).value = 1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -11, (where, r.returncode, r.stderr[-300:])


def test_first_and_last_byte_are_usable():
    gm = GuestMemory(1 << 16)
    gm.mem[0] = 1
    gm.mem[-1] = 2
    assert gm.read(0, 1) == b"\x01" and gm.read(gm.size - 1, 1) == b"\x02"
    with pytest.raises(ValueError):
        gm.view(gm.size - 1, 2)


@pytest.mark.parametrize("size", [0, -4096, 100, 4097])
def test_bad_sizes_rejected(size):
    with pytest.raises(ValueError):
        GuestMemory(size)


@settings(deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**40))
def test_check_range_is_exact(addr, length, size):
    want = addr + length <= size
    assert check_range(addr, length, size) == want
    # The kernel form sees the raw 64 bits as int64.
    a = addr - 2**64 if addr >= 2**63 else addr
    n = length - 2**64 if length >= 2**63 else length
    assert bool(in_ram(a, n, size)) == want


@njit(cache=True)
def _roundtrip(mem, off, v):
    memory.st_u64(mem, off, v)
    memory.st_u16_release(mem, off + 8, v)
    memory.fence()
    return (memory.ld_u8(mem, off), memory.ld_u16(mem, off + 1), memory.ld_u32(mem, off + 3),
            memory.ld_u64(mem, off), memory.ld_u16_acquire(mem, off + 8))


@pytest.mark.parametrize("off", [0, 1, 3, 7, 100])
@pytest.mark.parametrize("v", [0, 1, 0x0123456789ABCDEF, -1, 0x7FFF_FFFF_FFFF_FFFF])
def test_loads_and_stores_compiled_equal_python(off, v):
    a = np.zeros(128, np.uint8)
    b = np.zeros(128, np.uint8)
    got = _roundtrip(a, off, v)
    ref = getattr(_roundtrip, "py_func", _roundtrip)(b, off, v)   # plain Python either way
    assert a.tobytes() == b.tobytes()
    u = v & (2**64 - 1)
    assert ref[:3] == (u & 0xFF, (u >> 8) & 0xFFFF, (u >> 24) & 0xFFFFFFFF)
    assert ref[3] == u and ref[4] == u & 0xFFFF
    assert got[:3] == ref[:3] and got[4] == ref[4]
    assert got[3] & (2**64 - 1) == ref[3]


# ---------------------------------------------------------------- RAM images (snapshots)

def test_ram_image_is_sparse_and_maps_back_copy_on_write(tmp_path):
    size = 64 * PAGE_SIZE
    gm = GuestMemory(size)
    gm.write(3 * PAGE_SIZE + 5, b"hello")
    gm.write(4 * PAGE_SIZE, b"\x01" * PAGE_SIZE)        # a run of two pages with the one before
    gm.write(40 * PAGE_SIZE - 1, b"\x7f")                # last byte of page 39
    image = tmp_path / "ram"
    assert gm.save_image(str(image)) == 3 * PAGE_SIZE
    assert image.stat().st_size == size
    assert image.stat().st_blocks * 512 < size          # holes where the zero pages were
    want = gm.mem.copy()
    gm.close()

    a = GuestMemory(size, image=str(image))
    b = GuestMemory(size, image=str(image))
    assert np.array_equal(a.mem, want) and np.array_equal(b.mem, want)
    a.write(3 * PAGE_SIZE, b"XY")                        # private: neither the file nor b sees it
    assert b.read(3 * PAGE_SIZE, 7) == b"\0\0\0\0\0he"
    assert image.read_bytes()[3 * PAGE_SIZE:3 * PAGE_SIZE + 2] == b"\0\0"
    # the guard pages are still there around an image mapping
    whole = np.frombuffer(a._map, dtype=np.uint8)
    assert whole.ctypes.data + PAGE_SIZE == a.base
    a.close()
    b.close()


def test_ram_image_of_the_wrong_size_is_refused(tmp_path):
    image = tmp_path / "ram"
    image.write_bytes(b"\0" * PAGE_SIZE)
    with pytest.raises(ValueError, match="holds 4096 bytes"):
        GuestMemory(2 * PAGE_SIZE, image=str(image))
