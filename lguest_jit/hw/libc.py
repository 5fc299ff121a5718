"""libc calls usable from nogil kernels, each with a pure-Python fallback.

Compiled kernels call these as ``ExternalFunction``s (no GIL, cacheable);
under ``NUMBA_DISABLE_JIT=1`` the same names run the ``os``/ctypes
equivalents.  Every call returns the raw result (>= 0) or ``-errno``, never
raises, so kernels can handle EINTR/EAGAIN themselves.

Addresses are host addresses (``array.ctypes.data + offset``); callers
derive them only from checked guest ranges or their own arrays.  iovec
arguments point at ``count`` rows of (base, length) uint64 pairs.
"""
from __future__ import annotations

import ctypes

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import jitstart

jitstart.install()           # cached kernels load without Numba's 0.3 s target refresh

_libc = ctypes.CDLL(None, use_errno=True)

EIO = 5
EINTR = 4
EBADF = 9
EAGAIN = 11
# poll(2) event bits (<asm-generic/poll.h>)
POLLIN = 0x001
POLLOUT = 0x004
POLLERR = 0x008
POLLHUP = 0x010
POLLNVAL = 0x020
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
GRND_NONBLOCK = 0x01
CLOCK_MONOTONIC = 1

_i32, _i64, _ip, _up = types.int32, types.int64, types.intp, types.uintp

# name -> (C signature, Python argtypes for the fallback)
_SIGNATURES = {
    "read": (_ip(_i32, _up, _up), (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)),
    "write": (_ip(_i32, _up, _up), (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)),
    "readv": (_ip(_i32, _up, _i32), (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)),
    "writev": (_ip(_i32, _up, _i32), (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)),
    "preadv": (_ip(_i32, _up, _i32, _i64), (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)),
    "pwritev": (_ip(_i32, _up, _i32, _i64), (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)),
    "fdatasync": (_i32(_i32), (ctypes.c_int,)),
    "fallocate": (_i32(_i32, _i32, _i64, _i64), (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)),
    "getrandom": (_ip(_up, _up, types.uint32), (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)),
    # pollfds: ``count`` rows of struct pollfd {int fd; short events, revents}
    "poll": (_i32(_up, types.uint64, _i32), (ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int)),
    # ``tp`` -> struct timespec {i64 tv_sec; i64 tv_nsec}: the vDSO, no system call
    "clock_gettime": (_i32(_i32, _up), (ctypes.c_int, ctypes.c_void_p)),
    # ioctl(fd, request, arg): arg is an integer or a host address (KVM_RUN
    # from the compiled vCPU loop, KVM_IRQ_LINE from the UART)
    "ioctl": (_i32(_i32, types.uint64, _up), (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)),
    # time(NULL): the host's UTC seconds (the CMOS clock)
    "time": (_i64(_up), (ctypes.c_void_p,)),
    # a host socket's end (vsock connections, closed or half-closed from a kernel)
    "close": (_i32(_i32), (ctypes.c_int,)),
    "shutdown": (_i32(_i32, _i32), (ctypes.c_int, ctypes.c_int)),
    # a spinning thread gives its core to the lock's holder (2 cores, more threads)
    "sched_yield": (_i32(), ()),
}
_errno_location = types.ExternalFunction("__errno_location", types.CPointer(_i32)())
_libc.__errno_location  # noqa: B018 - load the symbol for LLVM


def _python_call(name, argtypes):
    # The NUMBA_DISABLE_JIT baseline: the same libc function through ctypes.
    cfunc = getattr(_libc, name)
    cfunc.argtypes = argtypes
    cfunc.restype = (ctypes.c_int if name in ("fdatasync", "fallocate", "poll", "ioctl", "clock_gettime", "close",
                                                "shutdown", "sched_yield")
                     else ctypes.c_int64 if name == "time" else ctypes.c_ssize_t)

    def call(*args):
        r = cfunc(*(int(a) for a in args))
        return -ctypes.get_errno() if r < 0 else r
    call.__name__ = f"sys_{name}"
    call.__doc__ = f"{name}(2) from a kernel: the result, or -errno."
    return call


def _bind_compiled(pyfunc, ext, nargs):
    # Numba wants the typing and implementing signatures to match, so one
    # pair per arity: call, then -errno on failure.
    if nargs == 0:
        def impl():
            r = ext()
            return -np.intp(_errno_location()[0]) if r < 0 else np.intp(r)
        overload(pyfunc)(lambda: impl)
    elif nargs == 1:
        def impl(a):
            r = ext(a)
            return -np.intp(_errno_location()[0]) if r < 0 else np.intp(r)
        overload(pyfunc)(lambda a: impl)
    elif nargs == 2:
        def impl(a, b):
            r = ext(a, b)
            return -np.intp(_errno_location()[0]) if r < 0 else np.intp(r)
        overload(pyfunc)(lambda a, b: impl)
    elif nargs == 3:
        def impl(a, b, c):
            r = ext(a, b, c)
            return -np.intp(_errno_location()[0]) if r < 0 else np.intp(r)
        overload(pyfunc)(lambda a, b, c: impl)
    else:
        def impl(a, b, c, d):
            r = ext(a, b, c, d)
            return -np.intp(_errno_location()[0]) if r < 0 else np.intp(r)
        overload(pyfunc)(lambda a, b, c, d: impl)


for _name, (_sig, _argtypes) in _SIGNATURES.items():
    _py = _python_call(_name, _argtypes)
    _bind_compiled(_py, types.ExternalFunction(_name, _sig), len(_sig.args))
    globals()[f"sys_{_name}"] = _py

# Names for linters and readers; bound in the loop above.
sys_read = globals()["sys_read"]
sys_write = globals()["sys_write"]
sys_readv = globals()["sys_readv"]
sys_writev = globals()["sys_writev"]
sys_preadv = globals()["sys_preadv"]
sys_pwritev = globals()["sys_pwritev"]
sys_fdatasync = globals()["sys_fdatasync"]
sys_fallocate = globals()["sys_fallocate"]
sys_getrandom = globals()["sys_getrandom"]
sys_poll = globals()["sys_poll"]
sys_clock_gettime = globals()["sys_clock_gettime"]
sys_ioctl = globals()["sys_ioctl"]
sys_time = globals()["sys_time"]
sys_close = globals()["sys_close"]
sys_shutdown = globals()["sys_shutdown"]
sys_sched_yield = globals()["sys_sched_yield"]


def host_iov(n: int) -> np.ndarray:
    """An (n, 2) uint64 array of (host address, length) rows for readv and friends."""
    return np.zeros((n, 2), dtype=np.uint64)


@njit(nogil=True, cache=True)
def fill_host_iov(mem, iov, first, count, hiov):
    """Rows first..first+count of a popped chain's iov (guest address, length,
    flags) -> host (address, length) rows in ``hiov``, skipping empty
    buffers; returns the row count.  The vring engine checked every entry
    against guest RAM when it popped the chain, so no check is repeated."""
    base = np.uint64(mem.ctypes.data)
    n = 0
    for k in range(first, first + count):
        if iov[k, 1] > 0:
            hiov[n, 0] = base + iov[k, 0]
            hiov[n, 1] = iov[k, 1]
            n += 1
    return n


def pollfds(n: int) -> np.ndarray:
    """An (n, 2) int32 array laid out as struct pollfd: [fd, events | revents << 16]."""
    return np.zeros((n, 2), dtype=np.int32)

