"""A minimal 8250 UART (COM1 at 0x3f8) for the guest's early console.

Only transmit matters: every byte written to THR goes to an output callback
(default: standard output).  The line is always ready (LSR THRE|TEMT), the
divisor latch and the other control registers just hold what was written,
and the modem-control loopback is modelled well enough for Linux's
autoconfig test (MCR LOOP makes MSR mirror the MCR outputs).  There is no
receive path: RBR reads 0 and LSR never reports data ready.

Register offsets and bits follow the 16450/8250 datasheet (Linux names them
in include/uapi/linux/serial_reg.h).
"""
from __future__ import annotations

import os

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


class Uart8250:
    """One 8250 at ``base``.  ``output(bytes)`` receives transmitted bytes;
    ``set_irq(level)``, if given, follows the THRE interrupt (raised when
    the guest enables it or writes THR with it enabled; cleared by reading
    IIR or disabling it), as the chip does.

    ``pio(port, size, is_write, value)`` is the bus handler signature;
    accesses wider than a byte act on consecutive registers.
    """

    def __init__(self, output=None, base: int = COM1, set_irq=None):
        self.base = base
        self.output = output if output is not None else (lambda b: write_all(1, b))
        self.set_irq = set_irq
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.scr = 0
        self.dll = 0x0C   # 9600 baud, as firmware usually leaves it
        self.dlm = 0
        self.fcr = 0
        self.thri_pending = False
        self.transmitted = 0

    _STATE = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr", "thri_pending")

    def save_state(self) -> dict:
        """The registers the guest programmed (a snapshot)."""
        return {k: int(getattr(self, k)) for k in self._STATE}

    def load_state(self, st: dict) -> None:
        for k in self._STATE:
            setattr(self, k, int(st[k]))
        self.thri_pending = bool(self.thri_pending)
        self._irq()

    def register(self, bus) -> None:
        """Claim ports base..base+7 on ``bus`` (bus.add_ports)."""
        bus.add_ports(self.base, NPORTS, self.pio)

    def _irq(self):
        if self.set_irq is not None:
            self.set_irq(bool(self.thri_pending and self.ier & IER_THRI))

    def msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return MSR_DCD | MSR_DSR | MSR_CTS     # a terminal is attached and ready

    def read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            return self.dll if dlab else 0
        if reg == IER_DLM:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            if self.thri_pending and self.ier & IER_THRI:
                self.thri_pending = False       # reading IIR acknowledges THRE
                self._irq()
                return IIR_THRI
            return IIR_NO_INT
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT
        if reg == MSR:
            return self.msr()
        return self.scr

    def write(self, reg: int, val: int) -> None:
        val &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                self.dll = val
                return
            if not self.mcr & MCR_LOOP:        # loopback: the byte never leaves
                self.output(bytes([val]))
                self.transmitted += 1
            self.thri_pending = True           # sent at once: THR is empty again
            self._irq()
        elif reg == IER_DLM:
            if dlab:
                self.dlm = val
            else:
                was = self.ier & IER_THRI
                self.ier = val & 0x0F
                if self.ier & IER_THRI and not was:
                    self.thri_pending = True   # enabling THRI with THR empty interrupts at once
                self._irq()
        elif reg == IIR_FCR:
            self.fcr = val                     # no FIFO: IIR bits 6-7 stay 0 (an 8250/16450)
        elif reg == LCR:
            self.lcr = val
        elif reg == MCR:
            self.mcr = val & 0x1F
        elif reg == SCR:
            self.scr = val
        # LSR and MSR writes are ignored (factory test registers)

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        reg = port - self.base
        if is_write:
            for i in range(size):
                if 0 <= reg + i < NPORTS:
                    self.write(reg + i, value >> (8 * i))
            return 0
        out = 0
        for i in range(size):
            b = self.read(reg + i) if 0 <= reg + i < NPORTS else 0xFF
            out |= b << (8 * i)
        return out


__all__ = ["Uart8250", "COM1", "write_all"]
