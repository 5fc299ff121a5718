"""A minimal 8250 UART (COM1 at 0x3f8) for the guest's early console.

Only transmit matters: every byte written to THR goes to an output callback
(default: standard output).  The line is always ready (LSR THRE|TEMT), the
divisor latch and the other control registers just hold what was written,
and the modem-control loopback is modelled well enough for Linux's
autoconfig test (MCR LOOP makes MSR mirror the MCR outputs).  There is no
receive path: RBR reads 0 and LSR never reports data ready.

The registers live in an int64 array (``U_*`` fields) and one kernel,
``uart_access``, does every access, so the compiled vCPU loop (pci's
dispatch) and the Python ``Uart8250.pio`` share the same state.  With
``out_fd`` the kernel writes transmitted bytes to that fd itself and with
``kvm_irq`` it drives the interrupt line with KVM_IRQ_LINE itself; with
Python callbacks it leaves the byte and the line level in the array for
``pio`` to hand on.

Register offsets and bits follow the 16450/8250 datasheet (Linux names them
in include/uapi/linux/serial_reg.h).
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

from .fields import Int, Record, check
from .libc import EAGAIN, EINTR, POLLOUT, sys_ioctl, sys_poll, sys_write

COM1 = 0x3F8
NPORTS = 8

# Register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

LCR_DLAB = 0x80
IER_THRI = 0x02               # transmitter-holding-register-empty interrupt
IIR_NO_INT, IIR_THRI = 0x01, 0x02
LSR_THRE, LSR_TEMT = 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a pipe or tty may take fewer)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            import select
            select.select([], [fd], [])
            continue
        view = view[n:]



# State array fields
U_IER, U_LCR, U_MCR, U_SCR, U_DLL, U_DLM, U_FCR, U_THRI, U_TX = range(9)
U_OUT_FD = 9          # >= 0: the kernel writes THR bytes there; -1: left in U_BYTE for Python
U_IRQ_FD = 10         # >= 0: a KVM VM fd, the kernel calls KVM_IRQ_LINE; -1: left for Python
U_IRQ_REQ = 11        # the KVM_IRQ_LINE request number
U_IRQ = 12            # struct kvm_irq_level {u32 irq; u32 level} for the ioctl, little-endian
U_BYTE = 13           # the byte transmitted by this access (Python output)
U_NOUT = 14           # 1 when U_BYTE holds one
U_IRQ_CALLS = 15      # how often the line was driven during this access (Python set_irq)
U_POLL = 16           # struct pollfd for a full output fd
U_FIELDS = 17

REG_NAMES = ("THR", "IER", "IIR", "LCR", "MCR", "LSR", "MSR", "SCR")


@njit(nogil=True, cache=True)
def write_all_fd(fd, addr, n, pfd_addr):
    """write(2) ``n`` bytes at host address ``addr`` until all are out:
    retries EINTR, waits in poll(2) on EAGAIN (``pfd_addr`` is one struct
    pollfd of scratch).  Returns 0, or -errno of a failed write (the byte
    is then dropped: a closed console never stops the guest)."""
    done = 0
    while done < n:
        r = sys_write(fd, addr + done, n - done)
        if r == -EINTR:
            continue
        if r == -EAGAIN:
            sys_poll(pfd_addr, 1, -1)
            continue
        if r < 0:
            return r
        done += r
    return 0


@njit(nogil=True, cache=True)
def _drive_irq(st):
    level = 1 if (st[U_THRI] != 0 and (st[U_IER] & IER_THRI) != 0) else 0
    st[U_IRQ_CALLS] += 1
    st[U_IRQ] = (st[U_IRQ] & 0xFFFFFFFF) | (level << 32)
    if st[U_IRQ_FD] >= 0:
        sys_ioctl(st[U_IRQ_FD], st[U_IRQ_REQ], st.ctypes.data + 8 * U_IRQ)


@njit(nogil=True, cache=True)
def _msr(mcr):
    if mcr & MCR_LOOP:
        v = 0
        if mcr & MCR_RTS:
            v |= MSR_CTS
        if mcr & MCR_DTR:
            v |= MSR_DSR
        if mcr & MCR_OUT1:
            v |= MSR_RI
        if mcr & MCR_OUT2:
            v |= MSR_DCD
        return v
    return MSR_DCD | MSR_DSR | MSR_CTS     # a terminal is attached and ready


@njit(nogil=True, cache=True)
def _read(st, reg):
    dlab = st[U_LCR] & LCR_DLAB
    if reg == RBR_THR_DLL:
        return st[U_DLL] if dlab else 0
    if reg == IER_DLM:
        return st[U_DLM] if dlab else st[U_IER]
    if reg == IIR_FCR:
        if st[U_THRI] != 0 and (st[U_IER] & IER_THRI) != 0:
            st[U_THRI] = 0                      # reading IIR acknowledges THRE
            _drive_irq(st)
            return IIR_THRI
        return IIR_NO_INT
    if reg == LCR:
        return st[U_LCR]
    if reg == MCR:
        return st[U_MCR]
    if reg == LSR:
        return LSR_THRE | LSR_TEMT
    if reg == MSR:
        return _msr(st[U_MCR])
    return st[U_SCR]


@njit(nogil=True, cache=True)
def _write(st, reg, val):
    val &= 0xFF
    dlab = st[U_LCR] & LCR_DLAB
    if reg == RBR_THR_DLL:
        if dlab:
            st[U_DLL] = val
            return
        if (st[U_MCR] & MCR_LOOP) == 0:        # loopback: the byte never leaves
            st[U_BYTE] = val
            st[U_NOUT] = 1
            if st[U_OUT_FD] >= 0:
                st[U_POLL] = st[U_OUT_FD] | (POLLOUT << 32)
                write_all_fd(st[U_OUT_FD], st.ctypes.data + 8 * U_BYTE, 1, st.ctypes.data + 8 * U_POLL)
            st[U_TX] += 1
        st[U_THRI] = 1                          # sent at once: THR is empty again
        _drive_irq(st)
    elif reg == IER_DLM:
        if dlab:
            st[U_DLM] = val
        else:
            was = st[U_IER] & IER_THRI
            st[U_IER] = val & 0x0F
            if (st[U_IER] & IER_THRI) != 0 and was == 0:
                st[U_THRI] = 1                  # enabling THRI with THR empty interrupts at once
            _drive_irq(st)
    elif reg == IIR_FCR:
        st[U_FCR] = val                         # no FIFO: IIR bits 6-7 stay 0 (an 8250/16450)
    elif reg == LCR:
        st[U_LCR] = val
    elif reg == MCR:
        st[U_MCR] = val & 0x1F
    elif reg == SCR:
        st[U_SCR] = val
    # LSR and MSR writes are ignored (factory test registers)


@njit(nogil=True, cache=True)
def uart_access(st, reg, size, is_write, value):
    """One port access at register ``reg`` (port - base; may lie outside
    0..7 for a wide access's other bytes) of ``size`` bytes: a wide access
    acts on consecutive registers.  Returns the value read (0 for writes).
    The caller resets U_NOUT/U_IRQ_CALLS when it wants to see them."""
    if is_write:
        for i in range(size):
            if 0 <= reg + i < NPORTS:
                _write(st, reg + i, value >> (8 * i))
        return 0
    out = 0
    for i in range(size):
        b = _read(st, reg + i) if 0 <= reg + i < NPORTS else 0xFF
        out |= b << (8 * i)
    return out


class Uart8250:
    """One 8250 at ``base``.  ``output(bytes)`` receives transmitted bytes;
    ``set_irq(level)``, if given, follows the THRE interrupt (raised when
    the guest enables it or writes THR with it enabled; cleared by reading
    IIR or disabling it), as the chip does.

    ``out_fd`` (instead of ``output``) and ``kvm_irq=(vm_fd, request,
    line)`` (instead of ``set_irq``) let compiled code do both without
    Python: then the bus's compiled dispatch serves the ports.

    ``pio(port, size, is_write, value)`` is the bus handler signature;
    accesses wider than a byte act on consecutive registers.
    """

    def __init__(self, output=None, base: int = COM1, set_irq=None, *, out_fd: int | None = None,
                 kvm_irq: tuple | None = None):
        if output is None and out_fd is None:
            out_fd = 1
        self.base = base
        self.output = output
        self.set_irq = set_irq
        self.state = np.zeros(U_FIELDS, dtype=np.int64)
        st = self.state
        st[U_MCR] = MCR_OUT2
        st[U_DLL] = 0x0C   # 9600 baud, as firmware usually leaves it
        st[U_OUT_FD] = -1 if output is not None else out_fd
        st[U_IRQ_FD] = -1
        if kvm_irq is not None:
            st[U_IRQ_FD], st[U_IRQ_REQ], st[U_IRQ] = kvm_irq

    @property
    def compiled(self) -> bool:
        """True when no Python callback is needed (compiled dispatch can serve it)."""
        return self.output is None and (self.set_irq is None or self.state[U_IRQ_FD] >= 0)

    @property
    def transmitted(self) -> int:
        return int(self.state[U_TX])

    # What the guest programmed, with the largest value each can hold; the
    # rest of the state array is this process's (fds, scratch).
    # The registers the guest programmed: what a snapshot holds, by name,
    # each bounded by what the chip can hold (a snapshot is a file: untrusted).
    _SAVED = {"ier": (U_IER, 0x0F), "lcr": (U_LCR, 0xFF), "mcr": (U_MCR, 0x1F), "scr": (U_SCR, 0xFF),
              "dll": (U_DLL, 0xFF), "dlm": (U_DLM, 0xFF), "fcr": (U_FCR, 0xFF), "thri": (U_THRI, 1),
              "tx": (U_TX, 2**62)}
    STATE = Record({name: Int(0, top) for name, (_, top) in _SAVED.items()})

    def save_state(self) -> dict:
        """The registers the guest programmed (a snapshot), by name."""
        return {name: int(self.state[f]) for name, (f, _) in self._SAVED.items()}

    def load_state(self, st: dict) -> None:
        """Put back ``save_state()``, every field checked (``STATE``)."""
        st = check(self.STATE, st, "uart")
        for name, (f, _) in self._SAVED.items():
            self.state[f] = st[name]

    def register(self, bus) -> None:
        """Claim ports base..base+7 on ``bus``: as a compiled handler when
        the bus has one and no Python callback is needed, else
        ``bus.add_ports``."""
        add = getattr(bus, "add_kernel_ports", None)
        if add is not None and self.compiled:
            self.state = add(self.base, NPORTS, self.pio, "uart", self.state)    # the bus holds the state now
        else:
            bus.add_ports(self.base, NPORTS, self.pio)

    def msr(self) -> int:
        return int(_msr(int(self.state[U_MCR])))

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        st = self.state
        st[U_NOUT] = 0
        st[U_IRQ_CALLS] = 0
        r = int(uart_access(st, port - self.base, size, is_write, value))
        if st[U_NOUT] and self.output is not None:
            self.output(bytes([int(st[U_BYTE]) & 0xFF]))
        if st[U_IRQ_CALLS] and self.set_irq is not None and st[U_IRQ_FD] < 0:
            self.set_irq(bool(st[U_IRQ] >> 32))
        return r


__all__ = ["Uart8250", "COM1", "write_all", "uart_access", "write_all_fd", "REG_NAMES"]
