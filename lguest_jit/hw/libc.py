"""libc calls usable from nogil kernels, each with a pure-Python fallback.

Compiled kernels call these as ``ExternalFunction``s (no GIL, cacheable);
under ``NUMBA_DISABLE_JIT=1`` the same names run the ``os`` equivalents on
the buffers the addresses point into.  Every call returns the raw result
(>= 0) or ``-errno``, never raises, so kernels can handle EINTR/EAGAIN.

Addresses are host addresses (``array.ctypes.data + offset``); callers
derive them only from checked guest ranges or their own arrays.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
from numba import types
from numba.extending import overload

_libc = ctypes.CDLL(None, use_errno=True)

_c_read = types.ExternalFunction("read", types.intp(types.int32, types.uintp, types.uintp))
_c_write = types.ExternalFunction("write", types.intp(types.int32, types.uintp, types.uintp))
_c_preadv = types.ExternalFunction("preadv", types.intp(types.int32, types.uintp, types.int32, types.int64))
_c_pwritev = types.ExternalFunction("pwritev", types.intp(types.int32, types.uintp, types.int32, types.int64))
_c_errno_loc = types.ExternalFunction("__errno_location", types.CPointer(types.int32)())

# Loading the symbols into LLVM's process-wide table lets cached kernels
# resolve them without the ctypes objects above.
for _name in ("read", "write", "preadv", "pwritev", "__errno_location"):
    getattr(_libc, _name)


def _neg_errno(exc: OSError) -> int:
    return -(exc.errno or 5)


def _view(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def sys_read(fd, addr, length):
    """read(2) into host memory at ``addr``."""
    try:
        return os.readv(fd, [_view(addr, length)]) if length else 0
    except OSError as exc:
        return _neg_errno(exc)


def sys_write(fd, addr, length):
    try:
        return os.write(fd, _view(addr, length)) if length else 0
    except OSError as exc:
        return _neg_errno(exc)


def _iovecs(iov_addr, count):
    rows = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(iov_addr)).reshape(count, 2)
    return [_view(int(a), int(n)) for a, n in rows]


def sys_preadv(fd, iov_addr, count, offset):
    """preadv(2); ``iov_addr`` points at ``count`` (base, len) uint64 pairs."""
    try:
        return os.preadv(fd, _iovecs(iov_addr, count), offset)
    except OSError as exc:
        return _neg_errno(exc)


def sys_pwritev(fd, iov_addr, count, offset):
    try:
        return os.pwritev(fd, _iovecs(iov_addr, count), offset)
    except OSError as exc:
        return _neg_errno(exc)


@overload(sys_read)
def _ol_read(fd, addr, length):
    def impl(fd, addr, length):
        r = _c_read(fd, addr, length)
        if r < 0:
            return -np.intp(_c_errno_loc()[0])
        return r
    return impl


@overload(sys_write)
def _ol_write(fd, addr, length):
    def impl(fd, addr, length):
        r = _c_write(fd, addr, length)
        if r < 0:
            return -np.intp(_c_errno_loc()[0])
        return r
    return impl


@overload(sys_preadv)
def _ol_preadv(fd, iov_addr, count, offset):
    def impl(fd, iov_addr, count, offset):
        r = _c_preadv(fd, iov_addr, count, offset)
        if r < 0:
            return -np.intp(_c_errno_loc()[0])
        return r
    return impl


@overload(sys_pwritev)
def _ol_pwritev(fd, iov_addr, count, offset):
    def impl(fd, iov_addr, count, offset):
        r = _c_pwritev(fd, iov_addr, count, offset)
        if r < 0:
            return -np.intp(_c_errno_loc()[0])
        return r
    return impl


EINTR = 4
EAGAIN = 11
