"""virtio-console (device type 3, virtio 1.0 §5.3): the guest's hvc0 on the
launcher's stdin and stdout.

Two queues, each served by its own thread running one nogil kernel:

* ``receiveq`` (queue 0, device -> driver): sleep in poll(2) on the input fd
  and the device's ``stop_fd``; when input is readable take a chain (sleeping
  on the queue's eventfd until the driver posts one) and readv straight into
  its buffers.  The kernel comes back to Python only for a chunk that is a
  lone ^C (lguest's "three ^C within a second" exit), at end of input, or
  when told to stop.  End of input ends this thread only: the guest and its
  output carry on (lguest naps forever in the same case).
* ``transmitq`` (queue 1, driver -> device): writev every chain to the
  output fd, resuming after partial writes, retrying EINTR and sleeping in
  poll for POLLOUT on EAGAIN (a non-blocking stdout or a full pipe).  A
  failing output (closed pipe, hung-up tty) drops the data and is counted;
  the first failure is reported once.

VIRTIO_CONSOLE_F_EMERG_WRITE: a write to ``emerg_wr`` (config offset 8) puts
its low byte on the output at once, from the vCPU thread.

:func:`raw_terminal` is the launcher's side of the tty: lguest turns off
ISIG, ICANON and ECHO on stdin and turns them back on when it exits.
"""
from __future__ import annotations

import atexit
import errno
import os
import select
import signal
import stat
import sys
import termios
import threading
import time

import numpy as np
from numba import njit

from ..hw.libc import (EAGAIN, EBADF, EINTR, EIO, POLLIN, POLLNVAL, POLLOUT, fill_host_iov, host_iov, pollfds,
                       sys_poll, sys_readv, sys_writev)
from ..hw.memory import ld_u8
from ..vring import (CHAIN_READABLE, CHAIN_WRITABLE, Q_IN, Q_IN_BYTES, Q_OUT, Q_OUT_BYTES, Q_STOP, STOPPED, complete,
                     finish, iov_advance, next_chain, notify_used, unpop)
from .base import Device

VIRTIO_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_EMERG_WRITE = 2     # §5.3.3

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 128

# Config layout (§5.3.4): cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
CFG_COLS = 0
CFG_ROWS = 2
CFG_MAX_NR_PORTS = 4
CFG_EMERG_WR = 8
CFG_SIZE = 12

CTRL_C = 0x03

# What the kernels return to Python besides STOPPED and -E_* (all positive).
RET_CTRL_C = 1          # receive: a chunk that was one ^C byte was delivered
RET_EOF = 2             # receive: input ended (read returned 0)
RET_INPUT_ERROR = 3     # receive: poll/read failed (errno in CS_IN_ERRNO)
RET_OUTPUT_ERROR = 4    # transmit: the first write failure (errno in CS_OUT_ERRNO)

# Console state: one int64 array per device, fields owned by one thread each.
CS_IN_CHUNKS = 0        # reads delivered to the guest (tells ^C chunks apart)
CS_IN_ERRNO = 1
CS_OUT_ERRORS = 2       # chains whose data could not all be written
CS_OUT_ERRNO = 3        # errno of the last failure
CS_OUT_DROPPED = 4      # bytes lost to those failures
CS_OUT_WAITS = 5        # times the output was full (EAGAIN) and we waited for POLLOUT
CS_FIELDS = 6

_W_STOPPED = -1         # _write_all: told to stop while waiting for POLLOUT


@njit(nogil=True, cache=True)
def _revents(pfd, k):
    return (np.int64(pfd[k, 1]) >> 16) & 0xFFFF


@njit(nogil=True, cache=True)
def _poll2(pfd, fd, events, stop_fd):
    """poll(fd for ``events``, stop_fd for input), no timeout.  Returns
    poll's result (>= 0) or -errno."""
    pfd[0, 0] = fd
    pfd[0, 1] = events
    pfd[1, 0] = stop_fd
    pfd[1, 1] = POLLIN
    return sys_poll(pfd.ctypes.data, 2, -1)


@njit(nogil=True, cache=True)
def _receive(mem, q, iov, notify_fd, isr, irq_fd, scratch, hiov, pfd, input_fd, stop_fd, cs):
    """receiveq service loop (lguest's console_input).  Returns STOPPED,
    -E_* for a driver error, or a RET_* event for Python."""
    head = -1
    n_iov = 0
    first = np.int64(0)
    while True:
        if q[Q_STOP]:
            code = STOPPED
            break
        # Wait for input first: the thread sleeps here, not holding a chain.
        r = _poll2(pfd, input_fd, POLLIN, stop_fd)
        if r == -EINTR:
            continue
        if r < 0:
            cs[CS_IN_ERRNO] = -r
            code = RET_INPUT_ERROR
            break
        if _revents(pfd, 1):
            code = STOPPED
            break
        rev = _revents(pfd, 0)
        if rev & POLLNVAL:
            cs[CS_IN_ERRNO] = EBADF
            code = RET_INPUT_ERROR
            break
        if rev == 0:
            continue
        if head < 0:
            head = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_WRITABLE, 0)
            if head < 0:
                code = head
                head = -1
                break
            if q[Q_IN_BYTES] == 0:
                # Nothing to read into; a zero-length readv would look like EOF.
                complete(mem, q, head, 0, 0)
                head = -1
                continue
            n_iov = fill_host_iov(mem, iov, 0, q[Q_IN], hiov)
            first = np.int64(hiov[0, 0]) - np.int64(mem.ctypes.data)
        r = sys_readv(input_fd, hiov.ctypes.data, n_iov)
        if r == -EINTR or r == -EAGAIN:
            continue            # keep the chain; poll again
        if r <= 0:
            code = RET_EOF if r == 0 else RET_INPUT_ERROR
            if r < 0:
                cs[CS_IN_ERRNO] = -r
            break
        # Console input is interactive: complete and interrupt right away.
        complete(mem, q, head, r, r)
        head = -1
        cs[CS_IN_CHUNKS] += 1
        notify_used(mem, q, isr, irq_fd, scratch)
        if r == 1 and ld_u8(mem, first) == CTRL_C:
            code = RET_CTRL_C
            break
    if head >= 0:
        unpop(q)        # input ended with a chain taken: it stays the driver's
    return finish(mem, q, isr, irq_fd, scratch, code)


@njit(nogil=True, cache=True)
def _write_all(fd, stop_fd, hiov, n, pfd, cs):
    """writev all of hiov[:n] to ``fd``, resuming after partial writes and
    waiting for POLLOUT on EAGAIN.  Returns (bytes written, 0 | errno |
    _W_STOPPED)."""
    done = 0
    k = 0
    while k < n:
        r = sys_writev(fd, np.uint64(hiov.ctypes.data) + np.uint64(16 * k), n - k)
        if r == -EINTR:
            continue
        if r == -EAGAIN:
            cs[CS_OUT_WAITS] += 1
            p = _poll2(pfd, fd, POLLOUT, stop_fd)
            if p < 0 and p != -EINTR:
                return done, -p
            if p > 0 and _revents(pfd, 1):
                return done, _W_STOPPED
            if p > 0 and _revents(pfd, 0) & POLLNVAL:
                return done, EBADF
            continue
        if r < 0:
            return done, -r
        if r == 0:
            return done, EIO
        done += r
        k = iov_advance(hiov, k, n, r)
    return done, 0


@njit(nogil=True, cache=True)
def _transmit(mem, q, iov, notify_fd, isr, irq_fd, scratch, hiov, pfd, output_fd, stop_fd, cs):
    """transmitq service loop (lguest's console_output).  Returns STOPPED,
    -E_* for a driver error, or RET_OUTPUT_ERROR the first time output fails."""
    while True:
        code = next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, CHAIN_READABLE, 0)
        if code < 0:
            break
        n = fill_host_iov(mem, iov, 0, q[Q_OUT], hiov)
        done, err = _write_all(output_fd, stop_fd, hiov, n, pfd, cs)
        if err > 0:
            cs[CS_OUT_ERRORS] += 1
            cs[CS_OUT_ERRNO] = err
            cs[CS_OUT_DROPPED] += q[Q_OUT_BYTES] - done
        # Written or not, the buffer goes back: nobody else will write it.
        complete(mem, q, code, 0, done)
        if err == _W_STOPPED:
            code = STOPPED
            break
        if err > 0 and cs[CS_OUT_ERRORS] == 1:
            code = RET_OUTPUT_ERROR
            break
    return finish(mem, q, isr, irq_fd, scratch, code)


_PTMX = os.makedev(5, 2)


def _nonblocking_twin(fd: int, access: int) -> int | None:
    """A private O_NONBLOCK open of what ``fd`` refers to, or None.

    The service threads must never sleep in read/write where a reset cannot
    wake them (a stalled pipe reader, a terminal under ^S).  Setting
    O_NONBLOCK on stdin/stdout themselves would change them for every
    process sharing them (the shell), so pipes and ttys are reopened through
    /proc for a file description of our own.  Regular files never block and
    other kinds (sockets, a pty master: reopening /dev/ptmx makes a new pty)
    are used as they are.
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)) or st.st_rdev == _PTMX:
        return None
    try:
        twin = os.open(f"/proc/self/fd/{fd}", access | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    got = os.fstat(twin)
    if (got.st_dev, got.st_ino, got.st_rdev) != (st.st_dev, st.st_ino, st.st_rdev):
        os.close(twin)
        return None
    return twin


def _default_log(message: str) -> None:
    print(f"lguest-jit: console: {message}", file=sys.stderr, flush=True)


class Console(Device):
    """``Console(input_fd=0, output_fd=1, on_fatal=None, on_interrupt_exit=None,
    log=None)``.

    ``input_fd`` feeds the receiveq (``None`` or -1: no input at all);
    ``output_fd`` takes the transmitq and emergency writes.  Either may be a
    tty, a pty, a pipe or a file, blocking or not.  The console neither
    changes terminal modes (see :func:`raw_terminal`) nor changes or closes
    the fds: while the queues run it uses private non-blocking opens of
    pipes and ttys (see ``_nonblocking_twin``), so a stalled reader or
    writer never keeps a reset or the launcher's exit waiting.

    ``on_interrupt_exit()`` is called when three chunks of input that are
    each a lone ^C arrive within ``CTRL_C_WINDOW`` seconds with nothing in
    between (lguest's way out of a guest that ignores ^C); without it,
    ``on_fatal("three ^C ...")`` is.  Either is called from the input thread,
    so it must ask the launcher to stop, not join that thread.  Every ^C is
    also delivered to the guest.  Input ends afterwards.

    ``log(message)`` gets the non-fatal events: end of input, the first
    output failure.  Default: stderr.
    """

    device_type = VIRTIO_ID_CONSOLE
    name = "console"
    queue_names = ("receiveq", "transmitq")
    kind = "console"
    pci_class = (0x07, 0x80)        # simple communication controller, other
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    CTRL_C_WINDOW = 1.0
    EMERGENCY_WAIT = 1.0     # seconds an emergency byte may wait for a full output

    @classmethod
    def from_options(cls, options, env):
        return cls(output_fd=env.console_fd, on_fatal=env.on_fatal, on_interrupt_exit=env.on_interrupt)

    def __init__(self, input_fd: int | None = 0, output_fd: int = 1, on_fatal=None, on_interrupt_exit=None,
                 log=None):
        super().__init__(on_fatal)
        if input_fd is None:
            input_fd = -1
        for what, fd in (("input_fd", input_fd), ("output_fd", output_fd)):
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < -1 or fd >= 2**31:
                raise ValueError(f"{what} must be a file descriptor, got {fd!r}")
        if output_fd < 0:
            raise ValueError("output_fd must be a file descriptor")
        self.input_fd = input_fd
        self.output_fd = output_fd
        self.on_interrupt_exit = on_interrupt_exit
        self.log = log or _default_log
        self.features = self.RING_FEATURES | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        # cols/rows and max_nr_ports stay 0: neither F_SIZE nor F_MULTIPORT is offered.
        self.config = np.zeros(CFG_SIZE, dtype=np.uint8)
        self.state = np.zeros(CS_FIELDS, dtype=np.int64)
        self.clock = time.monotonic            # tests may substitute a fake clock
        self.input_ended: str | None = None
        self.emergency_bytes = 0
        self.emergency_dropped = 0
        self.ctrl_c_seen = 0                   # lone-^C chunks delivered
        self._ctrl_c: list[tuple[float, int]] = []
        self._in_fd = self._out_fd = -1        # what the running threads use
        self._twins: list[int] = []

    # -- config space
    def config_write(self, offset: int, size: int, value: int) -> bool:
        """Only emerg_wr is writable (§5.3.4); its low byte goes out at once."""
        if offset != CFG_EMERG_WR or size not in (1, 2, 4):
            return False
        self.emergency_write(value & 0xFF)
        return True

    def emergency_write(self, byte: int) -> bool:
        """Put one byte on the output now (runs on the vCPU thread, so a full
        output is waited on for at most ``EMERGENCY_WAIT`` seconds).
        Returns False if the byte was dropped."""
        data = bytes([byte & 0xFF])
        deadline = time.monotonic() + self.EMERGENCY_WAIT
        writable = select.poll()
        writable.register(self.output_fd, select.POLLOUT)
        while True:
            left = deadline - time.monotonic()
            try:
                # Writable first: a pipe or tty that polls writable takes one
                # byte without blocking, even through a blocking fd.
                if left <= 0 or not writable.poll(max(1, int(left * 1000))):
                    break
                if os.write(self.output_fd, data) == 1:
                    self.emergency_bytes += 1
                    return True
            except BlockingIOError:
                continue
            except OSError:
                break
        self.emergency_dropped += 1
        return False

    # -- queue threads
    def on_activate(self, ctx) -> None:
        self._ctrl_c = []
        self._in_fd, self._out_fd = self.input_fd, self.output_fd
        if self.input_fd >= 0 and self.input_ended is None:
            twin = _nonblocking_twin(self.input_fd, os.O_RDONLY)
            if twin is not None:
                self._twins.append(twin)
                self._in_fd = twin
        twin = _nonblocking_twin(self.output_fd, os.O_WRONLY)
        if twin is not None:
            self._twins.append(twin)
            self._out_fd = twin

    def on_reset(self) -> None:
        # The threads are joined: nothing uses the private fds any more.
        for fd in self._twins:
            os.close(fd)
        self._twins.clear()
        self._in_fd = self._out_fd = -1

    def serve(self, index, ctx, stop_fd):
        args = (*self.queue_args(ctx, index), host_iov(self.queue_max_sizes[index]), pollfds(2))
        if index == RECEIVEQ:
            return self._serve_input(args, stop_fd)
        return self._serve_output(args, stop_fd)

    def _serve_input(self, args, stop_fd) -> int:
        if self._in_fd < 0 or self.input_ended is not None:
            return 0
        while True:
            code = int(_receive(*args, self._in_fd, stop_fd, self.state))
            if code == RET_CTRL_C:
                if self._three_ctrl_c():
                    self._end_input("three ^C: input stopped")
                    if self.on_interrupt_exit is not None:
                        self.on_interrupt_exit()
                    else:
                        self.on_fatal("three ^C within one second on the console")
                    return 0
                continue
            if code == RET_EOF:
                self._end_input("end of input; the guest keeps running without console input")
                return 0
            if code == RET_INPUT_ERROR:
                err = int(self.state[CS_IN_ERRNO])
                self._end_input(f"reading input failed ({errno.errorcode.get(err, err)}: {os.strerror(err)});"
                                " the guest keeps running without console input")
                return 0
            return code

    def _end_input(self, message: str) -> None:
        self.input_ended = message
        self.log(message)

    def _three_ctrl_c(self) -> bool:
        """lguest's exit hack: True when the last three input chunks were all
        a lone ^C and came within CTRL_C_WINDOW seconds."""
        self._ctrl_c.append((self.clock(), int(self.state[CS_IN_CHUNKS])))
        self.ctrl_c_seen += 1
        del self._ctrl_c[:-3]
        if len(self._ctrl_c) < 3:
            return False
        (t0, n0), _, (t2, n2) = self._ctrl_c
        if n2 - n0 == 2 and t2 - t0 <= self.CTRL_C_WINDOW:
            self._ctrl_c.clear()
            return True
        return False

    def _serve_output(self, args, stop_fd) -> int:
        while True:
            code = int(_transmit(*args, self._out_fd, stop_fd, self.state))
            if code != RET_OUTPUT_ERROR:
                return code
            err = int(self.state[CS_OUT_ERRNO])
            self.log(f"writing output failed ({errno.errorcode.get(err, err)}: {os.strerror(err)});"
                     " output is dropped while this lasts")

    def counters(self) -> dict:
        """Base counters; the transmitq's also says how many chains and bytes
        failed to go out and how often the output was full."""
        out = super().counters()
        out["transmitq"]["write_errors"] = int(self.state[CS_OUT_ERRORS])
        out["transmitq"]["dropped_bytes"] = int(self.state[CS_OUT_DROPPED])
        out["transmitq"]["output_full_waits"] = int(self.state[CS_OUT_WAITS])
        return out

    def close(self) -> None:
        """Stop and join the queue threads (the fds belong to the caller)."""
        self.reset()


# ---------------------------------------------------------------------------
# The launcher's terminal

_RAW_OFF = termios.ISIG | termios.ICANON | termios.ECHO
_RESTORE_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RawTerminal:
    """A tty in lguest's raw mode (no signals from keys, no line editing, no
    echo) until :meth:`restore`, which runs on every way out: ``with`` exit
    (normal or exception), ``atexit``, and SIGTERM/SIGINT/SIGHUP (restore,
    then whatever the signal did before: the previous handler, or dying of
    it).  SIGKILL cannot be caught: ``stty sane`` is the cure then.

    A non-tty fd (pipe, file) makes it a no-op.  Signal handlers can only be
    installed from the main thread; elsewhere only atexit and ``with``
    cover it.
    """

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.saved = None
        self._old_handlers: dict = {}

    @property
    def active(self) -> bool:
        return self.saved is not None

    def start(self) -> bool:
        """Switch to raw mode; False (and nothing done) if fd is no tty."""
        if self.saved is not None:
            return True
        try:
            saved = termios.tcgetattr(self.fd)
        except (termios.error, OSError):
            return False
        raw = list(saved)
        raw[3] &= ~_RAW_OFF
        # Handlers first: a signal between tcsetattr and them would leave the tty raw.
        self.saved = saved
        atexit.register(self.restore)
        if threading.current_thread() is threading.main_thread():
            for sig in _RESTORE_ON:
                try:
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):
                    pass
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, raw)
        except (termios.error, OSError):
            self.restore()
            return False
        return True

    def restore(self) -> None:
        """Put the saved modes back (idempotent) and the old handlers."""
        saved, self.saved = self.saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, saved)
            except (termios.error, OSError):
                pass                     # the tty is gone: nothing to restore
            atexit.unregister(self.restore)
        if self._old_handlers and threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, old)
            self._old_handlers = {}

    def _on_signal(self, signum, frame):
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            # Die of the signal as if it had never been caught.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "RawTerminal":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def raw_terminal(fd: int = 0) -> RawTerminal:
    """``with raw_terminal(0): ...`` -- see :class:`RawTerminal`."""
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"fd must be a file descriptor, got {fd!r}")
    return RawTerminal(fd)
