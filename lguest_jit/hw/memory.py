"""Guest "physical" memory and the primitives kernels use to touch it.

Guest RAM is one anonymous shared mapping with a PROT_NONE guard page on
each side, exposed as one numpy ``uint8`` array.  Guest physical address 0
is element 0.  A kernel that strays past either end faults on a guard page
instead of silently corrupting launcher memory, which is what lets the
property tests prove that no descriptor, however crafted, escapes the guest.

Kernels read and write guest memory only through the ``ld_*``/``st_*``
helpers below.  Each is a plain Python function (the ``NUMBA_DISABLE_JIT=1``
baseline) with a Numba overload that compiles to a single unaligned load or
store.  The ``*_acquire``/``*_release``/``fence`` variants are real atomic
operations: without them LLVM hoists a spin on ``avail.idx`` out of the loop
and reorders the used element past the used index.

Every helper takes a byte offset that the *caller* has already checked with
``in_ram``; none of them checks again (that is the point of checking once
per descriptor, not once per byte).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from . import jitstart

jitstart.install()           # cached kernels load without Numba's 0.3 s target refresh

PAGE_SIZE = mmap.PAGESIZE

# ---------------------------------------------------------------------------
# Bounds checking


@njit(nogil=True, cache=True)
def in_ram(addr, length, size):
    """True when [addr, addr+length) lies inside guest RAM of ``size`` bytes.

    ``addr`` arrives as the raw 64 guest bits: a value >= 2**63 reads as
    negative in compiled code (int64) and as a large int in Python; both are
    rejected.  Written as ``addr > size - length`` so nothing can wrap
    (lguest's check_pointer, done without the overflow).
    """
    if addr < 0 or length < 0 or length > size:
        return False
    return addr <= size - length


def check_range(addr: int, length: int, size: int) -> bool:
    """Public form of :func:`in_ram` for Python callers with unbounded ints:
    rejects anything beyond guest RAM or wrapping around 2**64."""
    if not (0 <= addr < 2**64 and 0 <= length < 2**64):
        return False
    return addr + length <= size


def put_le(arr, off: int, width: int, value: int) -> None:
    """Store ``value`` as ``width`` little-endian bytes at ``arr[off:]`` (a
    uint8 array): how Python builds config spaces and register pages; the
    kernels use ``st_*``.  The value is masked to the width."""
    arr[off:off + width] = np.frombuffer((int(value) & ((1 << 8 * width) - 1)).to_bytes(width, "little"),
                                         dtype=np.uint8)


def get_le(arr, off: int, width: int) -> int:
    """The ``width`` little-endian bytes at ``arr[off:]`` as an unsigned int."""
    return int.from_bytes(np.asarray(arr[off:off + width], dtype=np.uint8).tobytes(), "little")


# ---------------------------------------------------------------------------
# Guest memory


class GuestMemory:
    """Guest RAM: ``size`` bytes (a whole number of pages) between two
    PROT_NONE guard pages.

    ``.mem`` is the uint8 array kernels take; ``.base`` is its host address
    (for KVM_SET_USER_MEMORY_REGION, LHREQ_INITIALIZE and preadv iovecs).
    """

    def __init__(self, size: int, image: str | None = None):
        """``image``: a RAM image file of exactly ``size`` bytes (a
        snapshot's, see ``save_image``) mapped copy-on-write: the guest sees
        its contents, its writes stay private to this process, and start-up
        costs nothing per byte (pages are read when first touched, shared in
        the page cache by every guest started from the same image)."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE_SIZE}, got {size}")
        self.size = size
        total = size + 2 * PAGE_SIZE
        # MAP_NORESERVE: a 1 GiB guest costs nothing until it touches pages.
        self._map = mmap.mmap(-1, total, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        start = whole.ctypes.data
        _mprotect(start, PAGE_SIZE, 0)
        _mprotect(start + PAGE_SIZE + size, PAGE_SIZE, 0)
        if image is not None:
            _map_image(image, start + PAGE_SIZE, size)
        self.mem = whole[PAGE_SIZE:PAGE_SIZE + size]
        self.base = self.mem.ctypes.data

    def check(self, addr: int, length: int) -> bool:
        return check_range(addr, length, self.size)

    def view(self, addr: int, length: int) -> np.ndarray:
        """A checked slice of guest memory (Python-side helpers, loaders)."""
        if not self.check(addr, length):
            raise ValueError(f"guest range {addr:#x}+{length:#x} is outside guest RAM ({self.size:#x} bytes)")
        return self.mem[addr:addr + length]

    def write(self, addr: int, data) -> None:
        buf = np.frombuffer(bytes(data), dtype=np.uint8)
        self.view(addr, len(buf))[:] = buf

    def read(self, addr: int, length: int) -> bytes:
        return self.view(addr, length).tobytes()

    def save_image(self, path: str) -> int:
        """Write guest RAM to ``path`` as a sparse file: pages that are all
        zero become holes.  Returns the bytes written (the non-zero pages)."""
        pages = self.mem.reshape(-1, PAGE_SIZE)
        nonzero = np.flatnonzero(pages.any(axis=1))
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            # Runs of consecutive non-zero pages, one pwrite each.
            if len(nonzero):
                breaks = np.flatnonzero(np.diff(nonzero) != 1) + 1
                for run in np.split(nonzero, breaks):
                    lo, hi = int(run[0]) * PAGE_SIZE, (int(run[-1]) + 1) * PAGE_SIZE
                    view = memoryview(self.mem[lo:hi])
                    done = 0
                    while done < hi - lo:
                        done += os.pwrite(fd, view[done:], lo + done)
                    written += hi - lo
            os.fsync(fd)
        finally:
            os.close(fd)
        return written

    def close(self) -> None:
        """Unmap guest RAM.  Only safe once no thread can touch ``mem``."""
        self.mem = None
        try:
            self._map.close()
        except BufferError:
            # numpy views still exist somewhere; the mapping dies with them.
            pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_MAP_FIXED = 0x10


def _map_image(path: str, addr: int, size: int) -> None:
    """Replace [addr, addr + size) of our reservation with a private
    mapping of ``path`` (MAP_FIXED keeps the address the numpy array uses)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        have = os.fstat(fd).st_size
        if have != size:
            raise ValueError(f"RAM image {path} holds {have} bytes, the guest has {size}")
        got = _libc.mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if got != addr:
            err = ctypes.get_errno()
            raise OSError(err, f"mapping the RAM image {path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _mprotect(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(addr, length, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect of a guard page failed: {os.strerror(err)}")


# ---------------------------------------------------------------------------
# Loads and stores.  Python bodies are the NUMBA_DISABLE_JIT baseline; the
# overloads are what compiled kernels use.

# Each access is one numpy operation, so under the GIL another thread sees
# it whole: a 16-bit index stored byte by byte could be read torn (0x00FF ->
# 0x0100 seen as 0x0000), which the compiled atomic accesses never allow.

def ld_u8(mem, off):
    return int(mem[off])


def ld_u16(mem, off):
    return int(mem[off:off + 2].view(np.uint16)[0])


def ld_u32(mem, off):
    return int(mem[off:off + 4].view(np.uint32)[0])


def ld_u64(mem, off):
    return int(mem[off:off + 8].view(np.uint64)[0])


def st_u8(mem, off, val):
    mem[off] = val & 0xFF


def st_u16(mem, off, val):
    mem[off:off + 2].view(np.uint16)[0] = int(val) & 0xFFFF


def st_u32(mem, off, val):
    mem[off:off + 4].view(np.uint32)[0] = int(val) & 0xFFFFFFFF


def st_u64(mem, off, val):
    mem[off:off + 8].view(np.uint64)[0] = int(val) & 0xFFFFFFFFFFFFFFFF


# In the pure-Python baseline the GIL orders everything, so acquire/release
# are ordinary accesses.
def ld_u16_acquire(mem, off):
    return ld_u16(mem, off)


def st_u16_release(mem, off, val):
    st_u16(mem, off, val)


def fence():
    pass


# Shared launcher state (not guest memory): one int64 element of a 1-D
# C-contiguous array, e.g. a row of a device's MSI-X state, which a queue
# thread and the vCPU thread both update.  The fallbacks take a lock: in
# pure Python a thread switch may fall between the read and the write.
_xchg_lock = threading.Lock()


def xchg_i64(arr, i, val):
    """Atomically store ``val`` in ``arr[i]`` and return the old value (a
    full barrier, x86 ``xchg``): of two threads exchanging 0 into a flag,
    exactly one sees it set."""
    with _xchg_lock:
        old = int(arr[i])
        arr[i] = val
        return old


def ld_i64_acquire(arr, i):
    """``arr[i]`` as an acquire load (never hoisted out of a loop or above
    an earlier exchange)."""
    return int(arr[i])


def cpu_relax():
    """The spin-loop hint (x86 ``pause``): a busy-polling thread yields the
    core's pipeline and avoids the memory-order flush on loop exit."""


def _pointer(context, builder, arrty, arr, off, bits):
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = builder.gep(ary.data, [off])
    return builder.bitcast(ptr, ir.IntType(bits).as_pointer())


def _make_load(bits, ordering):
    @intrinsic
    def _load(typingctx, arr, off):
        def codegen(context, builder, sig, args):
            off64 = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = _pointer(context, builder, sig.args[0], args[0], off64, bits)
            if ordering:
                val = builder.load_atomic(ptr, ordering, bits // 8)
            else:
                val = builder.load(ptr, align=1)
            return builder.zext(val, ir.IntType(64)) if bits < 64 else val
        return types.int64(arr, off), codegen
    return _load


def _make_store(bits, ordering):
    @intrinsic
    def _store(typingctx, arr, off, val):
        def codegen(context, builder, sig, args):
            off64 = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = _pointer(context, builder, sig.args[0], args[0], off64, bits)
            v64 = context.cast(builder, args[2], sig.args[2], types.int64)
            v = builder.trunc(v64, ir.IntType(bits)) if bits < 64 else v64
            if ordering:
                builder.store_atomic(v, ptr, ordering, bits // 8)
            else:
                builder.store(v, ptr, align=1)
            return context.get_dummy_value()
        return types.void(arr, off, val), codegen
    return _store


@intrinsic
def _fence(typingctx):
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


def _bind(pyfunc, impl, nargs):
    # One overload per helper: the compiled body is just the intrinsic.
    if nargs == 2:
        @overload(pyfunc, inline="always")
        def _ol(mem, off):
            return lambda mem, off: impl(mem, off)
    else:
        @overload(pyfunc, inline="always")
        def _ol(mem, off, val):
            return lambda mem, off, val: impl(mem, off, val)


for _f, _bits in ((ld_u8, 8), (ld_u16, 16), (ld_u32, 32), (ld_u64, 64)):
    _bind(_f, _make_load(_bits, None), 2)
for _f, _bits in ((st_u8, 8), (st_u16, 16), (st_u32, 32), (st_u64, 64)):
    _bind(_f, _make_store(_bits, None), 3)


_bind(ld_u16_acquire, _make_load(16, "acquire"), 2)
_bind(st_u16_release, _make_store(16, "release"), 3)


@overload(fence, inline="always")
def _fence_ol():
    return lambda: _fence()


def _element(context, builder, arrty, arr, i):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [context.cast(builder, i[1], i[0], types.intp)])


@intrinsic
def _xchg_i64(typingctx, arr, i, val):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], (sig.args[1], args[1]))
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("xchg", ptr, v, "seq_cst")
    return types.int64(arr, i, val), codegen


@intrinsic
def _ld_i64_acquire(typingctx, arr, i):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], (sig.args[1], args[1]))
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, i), codegen


def _check_i64_row(arr):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == types.int64):
        raise TypeError(f"atomic int64 helpers take a 1-D C-contiguous int64 array, not {arr}")


@overload(xchg_i64, inline="always")
def _xchg_i64_ol(arr, i, val):
    _check_i64_row(arr)
    return lambda arr, i, val: _xchg_i64(arr, i, val)


@overload(ld_i64_acquire, inline="always")
def _ld_i64_acquire_ol(arr, i):
    _check_i64_row(arr)
    return lambda arr, i: _ld_i64_acquire(arr, i)


@intrinsic
def _pause(typingctx):
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.VoidType(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@overload(cpu_relax, inline="always")
def _cpu_relax_ol():
    return lambda: _pause()


__all__ = [
    "PAGE_SIZE", "GuestMemory", "in_ram", "check_range", "put_le", "get_le",
    "ld_u8", "ld_u16", "ld_u32", "ld_u64", "st_u8", "st_u16", "st_u32", "st_u64",
    "ld_u16_acquire", "st_u16_release", "fence", "cpu_relax", "xchg_i64", "ld_i64_acquire",
]
