"""PCI bus 0: legacy port bus (conf1, compiled UART/CMOS/reset ports,
Python handlers), BAR0 decode, interrupts and the exit dispatch.

Bus interface (what backends and tests call)
============================================
``Bus(mem, strict=False, notify_mode="per-queue", mmio_base=0xE0000000,
fatal=None, log=None, irqs=None, msix=False)``
    ``mem`` is the :class:`~lguest_jit.hw.memory.GuestMemory`.  ``strict``
    selects the policy for driver errors (below).  ``notify_mode`` is
    ``"per-queue"`` (one 16-bit notify register per queue, 4 bytes apart,
    notify_off_multiplier 4: the KVM ioeventfd layout) or ``"single"`` (one
    notify register per device, multiplier 0, the value written is the queue
    index: lguest's layout).  BAR0s are placed from ``mmio_base`` upwards,
    ``BAR0_SIZE`` bytes each.  ``fatal(message)`` is called when a device
    thread reports a driver error under ``strict`` (default: raise
    :class:`BadDriver` in that thread).  ``log(line)`` receives verbose
    lines; when it is None nothing is formatted.  ``irqs`` is the per-machine
    :class:`IrqAllocator` (one is made when omitted).  ``msix``: give every
    device an MSI-X capability (only for a backend that can deliver MSI:
    KVM; without it Linux takes INTx).

``bus.add_device(dev: VirtioDevice) -> Transport``
    Next free slot (00:01.0 upwards; 00:00.0 is the host bridge), BAR0 in
    the MMIO window, an interrupt line from the allocator, pin INTA.

``bus.pio(port: int, size: int, is_write: bool, value: int) -> int``
    Port I/O, sizes 1, 2, 4.  Reads return the value (zero-extended), writes
    return 0.  PCI configuration mechanism #1 lives at 0xCF8-0xCFF; ports
    nobody claimed read all-ones of the access size and ignore writes.

``bus.add_ports(first: int, count: int, handler)``
    Claim ``count`` ports from ``first`` for ``handler(port, size, is_write,
    value) -> int`` (same contract as ``pio``).  An access that runs past the
    end of a claimed range is split into byte accesses.

``bus.mmio(addr: int, size: int, is_write: bool, value: int) -> int``
    Memory-mapped I/O, sizes 1, 2, 4 and 8 (8 only for the 64-bit queue
    address fields; elsewhere it is a width error).  Addresses in no BAR
    read all-ones and ignore writes.

``bus.bar_at(addr: int, size: int = 1) -> tuple[Transport, int, int] | None``
    Which device's BAR holds guest-physical ``addr`` .. ``addr + size - 1``:
    ``(transport, bar number, offset in the BAR)``, or None when no single
    BAR holds all of it (what a backend asks before emulating an access).

``bus.ioeventfds() -> list[tuple[int, int, int]]``
    ``(gpa, length, eventfd)`` for each queue's notify register of every
    device whose BAR0 decodes (per-queue mode; ``[]`` in single mode, where one address carries every queue and
    the value decides).  A ``bus.mmio`` write there writes 1 to the same
    eventfd, so the KVM ioeventfd path and the exit path agree.

``bus.add_decode_listener(fn)``
    ``fn()`` is called (under the bus lock) whenever a BAR write changes
    which device decodes which page; ``ioeventfds()`` then lists the new
    set.  Decoding is rebuilt from every BAR0 on each write; overlapping
    BAR0s: the lowest slot decodes (see ``_rebuild_decode``).

``bus.interrupts() -> list[tuple[int, int]]``
    ``(irq_line, eventfd)``, one per device: writing 1 to the eventfd is the
    device raising its line (KVM: irqfd).  ``bus.irq_pending(line) -> bool``
    is True while a device on that line has a non-zero ISR and INTx is not
    disabled in its COMMAND register (level-triggered resample).

``bus.msi_routes() -> list[tuple[int, int | None, int]]``
    ``(eventfd, address, data)`` per MSI-X vector of every device, in a
    fixed order: writing 1 to the eventfd is the vector's message (KVM: an
    irqfd on an MSI route from address/data).  ``address`` is None while
    the device has MSI-X disabled.  ``bus.add_msi_listener(fn)``: ``fn()``
    runs (under the bus lock) whenever the list may have changed, before
    the vector concerned can send.

``bus.add_kernel_ports(first, count, handler, kind, state=None)``
    Like ``add_ports`` for a handler the compiled dispatch runs itself
    ("conf1", "uart", "cmos", "reset"); ``state`` is copied into the bus's
    tables and the view returned is where it lives from then on.

``bus.set_fallback(pio=None, mmio=None)``
    Python handlers for every port and address nobody claimed (a test rig
    that records every access; the launcher never sets them).

``bus.tables``, ``bus.pio_python``, ``bus.finish_mmio``,
``bus.compile_python_paths``
    What the vCPU loop (``lguest_jit.vcpu``) runs on: the flat dispatch
    tables, and the Python paths that finish what the compiled dispatch
    hands back.  Which tables are safe to share between vCPUs, and why,
    is in ``vcpu``'s docstring.

``bus.access_counts() -> list[tuple[str, int]]``
    Accesses by register ("conf1 data", "uart THR", "<device>
    common.queue_select", ...), non-zero only, most first (``--stats``).

``bus.close()``
    Resets every device (joins its threads) and closes the eventfds.

Threads: ``pio``/``mmio`` and every Python finish take a bus lock, so
several vCPU threads may call them.  Device threads only touch the ISR byte, the MSI-X pending bits,
``config_changed()`` and ``ctx.driver_error`` (which never take the bus lock, so a reset that joins
device threads under the lock cannot deadlock).  The ISR byte is updated
without an atomic read-and-clear: a device's OR racing a driver's ISR read
can lose one ISR bit (the eventfd still raises the interrupt).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import numba
import numpy as np
from numba import njit

from ..hw.cmos import REG_NAMES as CMOS_REG_NAMES, cmos_access
from ..hw.libc import EINTR, sys_time, sys_write
from ..hw.fields import Blob, List, OneOf, Record, U, blob, check
from ..hw.memory import GuestMemory
from ..hw.uart import REG_NAMES as UART_REG_NAMES, uart_access
from ..irq import MV_ADDR_HI, MV_ADDR_LO, MV_DATA, MX_ENABLED, MX_MASKED
from .config import (C_ADDR, C_FIELDS, CONFIG_ADDRESS, CONFIG_DATA, H_BAR0, H_CFG_DATA, H_COMMAND, H_MSIX,
                     HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR, MAX_SLOTS, P_CFG, P_HOOK, P_PLANES, P_REGION, P_WMASK,
                     PCI_BASE_ADDRESS_0, PCI_CFG_SPACE_SIZE, REGION_UNUSED, ConfigBuilder, HostBridge, conf1_access,
                     read_le, size_mask)
from .device import IrqAllocator, VirtioDevice
from .transport import (A_NONE, A_NOTIFY, B_CFG, BAR0_SHIFT, BAR0_SIZE, COMMON_FIELD_NAMES, COMMON_LEN, DEVCFG_MAX,
                        DEVCFG_OFF, E_BAR_RANGE, FIELD_AT, FIELD_START, ISR_OFF, MAX_QUEUES, MSIX_FIELDS,
                        MSIX_MAX_VECTORS, MSIX_PBA_OFF, MSIX_TABLE_OFF, NOTIFY_OFF, QC_FIELDS, S_FIELDS, Transport,
                        bar0_access)


# ---------------------------------------------------------------------------
# Exit dispatch: flat tables and the port/MMIO dispatch kernels
#
# Every port and MMIO access -- a KVM exit in the compiled vCPU loop, or a
# ``bus.pio``/``bus.mmio`` call from Python (lguest backend, tests, the
# harness) -- goes through ``port_access``/``mmio_access`` over the bus's
# tables (``Bus.tables``, a tuple of arrays, T_* order).  They finish
# everything a compiled handler can answer; the rest they hand to Python
# with nothing done that cannot be repeated (ST_PYTHON: redo the access in
# Python) or with ``bar0_access``'s result left in the pending record
# (ST_BAR_SLOW: ``Transport._slow`` finishes it).  The vCPU loop over these
# tables is ``lguest_jit.vcpu``.

# Port table columns (``ports[port, field]``, int32: one port's fields in one cache line)
PT_KIND, PT_FIRST, PT_LAST, PT_ROW = range(4)
PK_NONE, PK_PYTHON, PK_CONF1, PK_UART, PK_CMOS, PK_RESET = range(6)
PORT_KINDS = {"python": PK_PYTHON, "conf1": PK_CONF1, "uart": PK_UART, "cmos": PK_CMOS, "reset": PK_RESET}
KSTATE_ROWS = 4           # compiled port devices with state (UART, CMOS)
KSTATE_WIDTH = 258        # >= hw.uart.U_FIELDS, hw.cmos.C_FIELDS
RESET_VALUE = 0xFE        # pulse the reset line (8042 command)

# Access status
ST_DONE, ST_PYTHON, ST_BAR_SLOW = 0, 1, 2

# Pending record (``pend``, int64; one per vCPU, and the bus's own for
# Python callers): what Python needs to finish an access
PD_INDEX, PD_SLOT, PD_OFF, PD_SIZE, PD_WRITE, PD_VALUE, PD_R, PD_ACTION, PD_ARG, PD_ERR, PD_STATUS, PD_ONE = \
    range(12)
PD_FIELDS = 12

# MMIO counter columns per slot: the common-config field ids, then these
M_ISR = len(FIELD_START)
M_DEVCFG = M_ISR + 1
M_NOTIFY = M_ISR + 2
M_MSIX_TABLE = M_ISR + 3
M_MSIX_PBA = M_ISR + 4
M_OTHER = M_ISR + 5
M_REGS = M_ISR + 6
M_NAMES = tuple(f"common.{n}" for n in COMMON_FIELD_NAMES) + ("isr", "device_cfg", "notify", "msix.table",
                                                             "msix.pba", "other")
PAGE_SLOTS = 1 << (32 - BAR0_SHIFT)      # every BAR0-sized page below 4 GiB
PAGE_FALLBACK = -1        # page_slot value: no BAR0, the Python fallback answers (set_fallback)

# Tables tuple order
T_CONF, T_SPACE, T_PORTS, T_KSTATE, T_PAGE_SLOT, T_REGS, T_BYTES, T_MSIX, T_NOTIFY_FD, T_PORT_COUNTS, \
    T_MMIO_COUNTS = range(11)


@njit(nogil=True, cache=True, inline='always')
def _port_one(conf, space, ports, kstate, kind, port, size, is_write, value):
    """One access to one handler's ports; (result, ST_*)."""
    ones = 0 if is_write else size_mask(size)
    if kind == PK_NONE:
        return ones, ST_DONE
    if kind == PK_CONF1:
        r, hooks = conf1_access(conf, space, port, size, is_write, value & 0xFFFFFFFF, False)
        # A hook (BAR0, COMMAND, the PCI_CFG window) runs in Python; a
        # config write is idempotent, so Python repeats the whole access.
        return r, (ST_PYTHON if hooks != 0 else ST_DONE)
    if kind == PK_UART:
        return uart_access(kstate[ports[port, PT_ROW]], port - ports[port, PT_FIRST], size, is_write,
                           value), ST_DONE
    if kind == PK_CMOS:
        return cmos_access(kstate[ports[port, PT_ROW]], port, size, is_write, value, sys_time(0)), ST_DONE
    if kind == PK_RESET:
        if is_write and (value & 0xFF) == RESET_VALUE:
            return 0, ST_PYTHON            # Python ends the run as a reboot
        return ones, ST_DONE               # reads: no keyboard controller
    return 0, ST_PYTHON                    # PK_PYTHON


@njit(nogil=True, cache=True, inline="always")
def port_access(conf, space, ports, kstate, counts, port, size, is_write, value):
    """A port access (0 <= port <= 0xFFFF, size 1/2/4): (result, ST_*).
    Unclaimed ports read all-ones; an access running past the end of a
    claimed range is split into bytes, as the chipset would."""
    counts[port] += 1
    kind = ports[port, PT_KIND]
    if kind == PK_NONE:
        return (0 if is_write else size_mask(size)), ST_DONE
    if port + size - 1 <= ports[port, PT_LAST]:
        return _port_one(conf, space, ports, kstate, kind, port, size, is_write, value)
    for i in range(size):
        k = ports[(port + i) & 0xFFFF, PT_KIND]
        if k == PK_PYTHON or k == PK_CONF1 or k == PK_RESET:
            return 0, ST_PYTHON            # Python splits it before anything is done
    r = 0
    for i in range(size):
        p = (port + i) & 0xFFFF
        v, _ = _port_one(conf, space, ports, kstate, ports[p, PT_KIND], p, 1, is_write, (value >> (8 * i)) & 0xFF)
        r |= (v & 0xFF) << (8 * i)
    return (0 if is_write else r), ST_DONE


@njit(nogil=True, cache=True, inline='always')
def _mmio_reg(off):
    if off < COMMON_LEN:
        return FIELD_AT[off]
    if off == ISR_OFF:
        return M_ISR
    if off >= MSIX_PBA_OFF:
        return M_MSIX_PBA
    if off >= MSIX_TABLE_OFF:
        return M_MSIX_TABLE
    if off >= NOTIFY_OFF:
        return M_NOTIFY
    if off >= DEVCFG_OFF:
        return M_DEVCFG
    return M_OTHER


@njit(nogil=True, cache=True, inline="always")
def mmio_access(page_slot, regs, bytes_, msix, notify_fd, counts, pend, addr, size, is_write, value):
    """An MMIO access (size 1/2/4/8): (result, ST_*).  Addresses in no BAR0
    read all-ones (-1 for 8 bytes) and ignore writes; BAR0 goes to
    ``bar0_access``, whose notify action becomes an eventfd write here."""
    slot = 0
    if 0 <= addr < (1 << 32):
        slot = page_slot[addr >> BAR0_SHIFT]
    if slot <= 0:
        counts[MAX_SLOTS, M_OTHER] += 1
        if slot == PAGE_FALLBACK:
            pend[PD_STATUS] = ST_PYTHON
            return 0, ST_PYTHON
        if is_write:
            return 0, ST_DONE
        return (-1 if size == 8 else size_mask(size)), ST_DONE
    off = addr & (BAR0_SIZE - 1)
    counts[slot, _mmio_reg(off)] += 1
    if size > 4 or off + size > BAR0_SIZE:
        pend[PD_STATUS] = ST_PYTHON
        return 0, ST_PYTHON                # 64-bit halves and range errors: Python
    r, action, arg, err = bar0_access(regs[slot], bytes_[slot], msix[slot], off, size, is_write, value & 0xFFFFFFFF)
    if err == 0 and action == A_NONE:
        return r, ST_DONE
    if err == 0 and action == A_NOTIFY:
        fd = notify_fd[slot, arg]
        if fd >= 0:
            pend[PD_ONE] = 1
            while sys_write(fd, pend.ctypes.data + 8 * PD_ONE, 8) == -EINTR:
                pass
        return 0, ST_DONE
    pend[PD_STATUS] = ST_BAR_SLOW
    pend[PD_SLOT] = slot
    pend[PD_OFF] = off
    pend[PD_SIZE] = size
    pend[PD_WRITE] = 1 if is_write else 0
    pend[PD_VALUE] = value
    pend[PD_R] = r
    pend[PD_ACTION] = action
    pend[PD_ARG] = arg
    pend[PD_ERR] = err
    return r, ST_BAR_SLOW


# ---------------------------------------------------------------------------
# Bus


class Bus:
    """PCI bus 0 behind conf1, and the MMIO window of the BARs on it."""

    def __init__(self, mem: GuestMemory, strict: bool = False, notify_mode: str = "per-queue",
                 mmio_base: int = 0xE0000000, fatal: Optional[Callable[[str], None]] = None,
                 log: Optional[Callable[[str], None]] = None, irqs: Optional[IrqAllocator] = None,
                 msix: bool = False):
        if notify_mode not in ("per-queue", "single"):
            raise ValueError(f"notify_mode must be 'per-queue' or 'single', not {notify_mode!r}")
        if mmio_base % BAR0_SIZE or not 0 < mmio_base < 1 << 32:
            raise ValueError(f"mmio_base {mmio_base:#x} must be a {BAR0_SIZE:#x}-aligned 32-bit address")
        if mmio_base < mem.size:
            raise ValueError(f"mmio_base {mmio_base:#x} overlaps guest RAM ({mem.size:#x} bytes)")
        self.mem, self.strict, self.notify_mode, self.mmio_base = mem, strict, notify_mode, mmio_base
        self.fatal = fatal      # None: device threads raise BadDriver themselves
        self.log = log
        self.irqs = irqs if irqs is not None else IrqAllocator()
        self.offer_msix = bool(msix)
        self._msi_listeners: list = []
        self.conf = np.zeros(C_FIELDS, dtype=np.int64)
        self.msix = np.zeros((MAX_SLOTS, 1 + MSIX_MAX_VECTORS, MSIX_FIELDS), dtype=np.int64)
        # Flat dispatch tables (see "Exit dispatch"): zero pages until touched.
        self.regs = np.zeros((MAX_SLOTS, 1 + MAX_QUEUES, max(S_FIELDS, QC_FIELDS)), dtype=np.int64)
        self.bytes_ = np.zeros((MAX_SLOTS, B_CFG + DEVCFG_MAX), dtype=np.uint8)
        self.notify_fd = np.full((MAX_SLOTS, MAX_QUEUES), -1, dtype=np.int64)
        self.ports = np.zeros((0x10000, 4), dtype=np.int32)   # a port's fields share a cache line
        self.kstate = np.zeros((KSTATE_ROWS, KSTATE_WIDTH), dtype=np.int64)
        self._kstate_used = 0
        self.page_slot = np.zeros(PAGE_SLOTS, dtype=np.int8)
        self.port_counts = np.zeros(0x10000, dtype=np.int64)
        self.mmio_counts = np.zeros((MAX_SLOTS + 1, M_REGS), dtype=np.int64)
        self._more_counts: list = []    # (port, mmio) counter arrays of vCPUs 1.. (vcpu_tables)
        self.pend = np.zeros(PD_FIELDS, dtype=np.int64)    # bus.mmio's (a vCPU loop has its own)
        self._pio_fallback = self._mmio_fallback = None
        self.space = np.zeros((MAX_SLOTS, P_PLANES, PCI_CFG_SPACE_SIZE), dtype=np.uint8)
        self.space[:, P_REGION, :] = REGION_UNUSED
        # Views of the planes, for Python-side code and tests.
        self.cfg = self.space[:, P_CFG, :]
        self.wmask = self.space[:, P_WMASK, :]
        self.hook = self.space[:, P_HOOK, :]
        self.region = self.space[:, P_REGION, :]
        self.slots: list = [None] * MAX_SLOTS
        self.devices: list[Transport] = []
        self._ports: dict = {}          # port -> (handler, last port of its range)
        self._pages: dict = {}          # BAR0 page number -> Transport (see _rebuild_decode)
        self._decode_listeners: list = []
        self._lock = threading.Lock()   # vCPU threads take turns on the bus
        bridge = ConfigBuilder(self.cfg[0], self.wmask[0], self.hook[0], self.region[0])
        bridge.header(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0, 0x06, 0x00, 0, 0, 0, pin=0, line=0)
        self.slots[0] = HostBridge()
        self.tables = (self.conf, self.space, self.ports, self.kstate, self.page_slot, self.regs, self.bytes_,
                       self.msix, self.notify_fd, self.port_counts, self.mmio_counts)
        # Two ranges, so an access straddling them is split per byte.
        self.add_kernel_ports(CONFIG_ADDRESS, 4, self._conf1_port, "conf1")
        self.add_kernel_ports(CONFIG_DATA, 4, self._conf1_port, "conf1")

    # -- devices -----------------------------------------------------------
    def add_device(self, dev: VirtioDevice) -> Transport:
        slot = next((s for s in range(1, MAX_SLOTS) if self.slots[s] is None), None)
        if slot is None:
            raise ValueError("PCI bus 0 is full (31 devices)")
        bar0 = self.mmio_base + BAR0_SIZE * len(self.devices)
        if bar0 + BAR0_SIZE > 1 << 32:
            raise ValueError("the MMIO window runs past 4 GiB")
        t = Transport(self, dev, slot, bar0, self.irqs.allocate())
        self.slots[slot] = t
        self.devices.append(t)
        self._rebuild_decode()
        if self.log is not None:
            self.log(f"device {len(self.devices)}: {dev.name} at 00:{slot:02x}.0, BAR0 {bar0:#x}, irq {t.irq_line}")
        return t

    # -- port I/O ----------------------------------------------------------
    def add_ports(self, first: int, count: int, handler) -> None:
        self.add_kernel_ports(first, count, handler, "python")

    def add_kernel_ports(self, first: int, count: int, handler, kind: str, state=None):
        """Claim ports like ``add_ports``, served by the compiled handler
        ``kind`` ("conf1", "uart", "cmos", "reset"; "python": only
        ``handler``).  ``handler`` still serves the rare accesses Python
        finishes.  ``state`` (uart, cmos) is copied into the bus's tables;
        the view returned is where the device's state lives from now on."""
        if not (0 <= first and count > 0 and first + count <= 0x10000):
            raise ValueError(f"port range {first:#x}+{count} is outside 0..0xffff")
        if kind not in PORT_KINDS:
            raise ValueError(f"unknown port handler kind {kind!r}")
        last = first + count - 1
        for p in range(first, first + count):
            if p in self._ports:
                raise ValueError(f"port {p:#x} is already claimed")
        view = None
        row = 0
        if state is not None:
            if self._kstate_used == KSTATE_ROWS or len(state) > KSTATE_WIDTH:
                raise ValueError("no room for another compiled port device's state")
            row = self._kstate_used
            self._kstate_used += 1
            view = self.kstate[row, :len(state)]
            view[:] = state
        for p in range(first, first + count):
            self._ports[p] = (handler, last)
        self.ports[first:last + 1, PT_KIND] = PORT_KINDS[kind]
        self.ports[first:last + 1, PT_FIRST] = first
        self.ports[first:last + 1, PT_LAST] = last
        self.ports[first:last + 1, PT_ROW] = row
        return view

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        if size not in (1, 2, 4):
            raise ValueError(f"port access size must be 1, 2 or 4, not {size}")
        if not 0 <= port <= 0xFFFF:
            return 0 if is_write else (1 << 8 * size) - 1
        with self._lock:
            r, st = port_access(self.conf, self.space, self.ports, self.kstate, self.port_counts, port, size,
                                 is_write, value & 0xFFFFFFFF)
        if st == ST_DONE:
            return int(r)
        return self.pio_python(port, size, is_write, value)

    def pio_python(self, port, size, is_write, value):
        """A port access the compiled dispatch handed back (ST_PYTHON):
        Python-only handlers, conf1 hooks, the reset port, splits touching
        those, the fallback."""
        ent = self._ports.get(port)
        if ent is None:
            if self._pio_fallback is not None:
                return self._pio_fallback(port, size, is_write, value)
            return 0 if is_write else (1 << 8 * size) - 1
        if port + size - 1 > ent[1]:
            return self._split_pio(port, size, is_write, value)
        return ent[0](port, size, is_write, value)

    def _split_pio(self, port, size, is_write, value):
        # An access running off the end of a device's ports: byte by byte,
        # as the chipset would split it.
        r = 0
        for i in range(size):
            r |= self.pio_python((port + i) & 0xFFFF, 1, is_write, (value >> 8 * i) & 0xFF) << 8 * i
        return 0 if is_write else r

    def _conf1_port(self, port, size, is_write, value):
        with self._lock:
            r, hooks = conf1_access(self.conf, self.space, port, size, is_write, value & 0xFFFFFFFF, False)
            if hooks == 0:
                return r
            target = self.slots[(int(self.conf[C_ADDR]) >> 11) & 31]
            if not is_write:
                target.window_read()
                r, _ = conf1_access(self.conf, self.space, port, size, False, 0, True)
                return r
            if hooks & (1 << H_BAR0):
                self._bar0_written(target)
            if hooks & (1 << H_COMMAND):
                target.command_written()
            if hooks & (1 << H_CFG_DATA):
                target.window_write()
            if hooks & (1 << H_MSIX):
                target.msix_control_written()
            return 0

    def _bar0_written(self, t):
        """Any write to a BAR0 register, changed or not: decode is rebuilt
        from every device's current BAR0 (a pure function of the BAR values),
        so an overlap that ends restores the device it hid."""
        new = read_le(self.cfg[t.slot], PCI_BASE_ADDRESS_0, 4) & ~(BAR0_SIZE - 1) & 0xFFFFFFFF
        moved = new != t.bar0
        t.bar0 = new
        if moved and self.log is not None:
            self.log(f"{t.name}: BAR0 moved to {new:#x}")
        self._rebuild_decode()

    def _rebuild_decode(self):
        """The page -> device map from the BARs.  Overlap rule: when two
        BAR0s claim one page the device in the lowest slot decodes it, the
        others are hidden there (undefined on real PCI; here deterministic
        and independent of the order of the writes).  BAR0 = 0 (unassigned)
        and the all-ones sizing probe decode nothing."""
        pages = {}
        for t in sorted(self.devices, key=lambda d: d.slot):
            if t.bar0 and t.bar0 != (~(BAR0_SIZE - 1) & 0xFFFFFFFF):
                pages.setdefault(t.bar0 >> BAR0_SHIFT, t)
        if pages == self._pages:
            return
        empty = 0 if self._mmio_fallback is None else PAGE_FALLBACK
        for page in self._pages:
            self.page_slot[page] = empty
        for page, t in pages.items():
            self.page_slot[page] = t.slot
        self._pages = pages
        for listener in self._decode_listeners:
            listener()

    def add_decode_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of BAR decoding (under the
        bus lock), so a backend can move what it registered per address,
        e.g. KVM ioeventfds (``ioeventfds()`` then lists the new set)."""
        self._decode_listeners.append(listener)

    def set_fallback(self, pio: Optional[Callable] = None, mmio: Optional[Callable] = None) -> None:
        """Python handlers (``pio``/``mmio``'s signature) for every port and
        every address below 4 GiB that nobody claims: a test rig that sees
        every access.  Ports claimed later still go to their claimer."""
        if pio is not None:
            self._pio_fallback = pio
            free = self.ports[:, PT_KIND] == PK_NONE
            # One-port ranges: a wider access is handed to Python whole.
            self.ports[free, PT_KIND] = PK_PYTHON
            self.ports[free, PT_FIRST] = self.ports[free, PT_LAST] = np.flatnonzero(free)
        if mmio is not None:
            self._mmio_fallback = mmio
            self.page_slot[self.page_slot == 0] = PAGE_FALLBACK

    # -- MMIO --------------------------------------------------------------
    def mmio(self, addr: int, size: int, is_write: bool, value: int) -> int:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO access size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= addr < 1 << 32:
            return 0 if is_write else (1 << 8 * size) - 1
        with self._lock:
            r, st = mmio_access(self.page_slot, self.regs, self.bytes_, self.msix, self.notify_fd, self.mmio_counts,
                                 self.pend, addr, size, is_write, value & 0xFFFFFFFF)
            if st == ST_BAR_SLOW:
                return self._bar_slow(value, self.pend)
        if st == ST_DONE:
            return int(r) & ((1 << 8 * size) - 1)
        return self._mmio_python(addr, size, is_write, value)

    def finish_mmio(self, pend, addr: int, size: int, is_write: bool, value: int) -> int:
        """An MMIO access the compiled dispatch handed back, ``pend`` the
        pending record it filled (the vCPU's own)."""
        if pend[PD_STATUS] == ST_BAR_SLOW:
            with self._lock:
                return self._bar_slow(value, pend)
        return self._mmio_python(addr, size, is_write, value)

    def _bar_slow(self, value, p):
        # bar0_access's result is in the pending record ``p``; the transport
        # applies the policy and runs the action (under the bus lock).
        t = self.slots[int(p[PD_SLOT])]
        return t._slow(int(p[PD_OFF]), int(p[PD_SIZE]), bool(p[PD_WRITE]), value, int(p[PD_R]),
                       int(p[PD_ACTION]), int(p[PD_ARG]), int(p[PD_ERR]))

    def _mmio_python(self, addr, size, is_write, value):
        # 8-byte accesses and accesses running off the end of BAR0.
        t = self._pages.get(addr >> BAR0_SHIFT)
        if t is None:
            if self._mmio_fallback is not None and 0 <= addr < 1 << 32:
                return self._mmio_fallback(addr, size, is_write, value)
            return 0 if is_write else (1 << 8 * size) - 1
        off = addr - t.bar0
        with self._lock:
            if off + size > BAR0_SIZE:
                t.driver_error(E_BAR_RANGE, f"{size}-byte access at BAR0+{off:#x}")
                return 0
            return t.bar_access(off, size, is_write, value)

    def compile_python_paths(self):
        """Compile (or load from the cache) the kernels the bus calls from
        Python, before they are needed: a first compile at a slow exit
        would take seconds (timeouts, watchdogs).  Nothing is accessed."""
        regs, by, mx = self.regs[0, :1], self.bytes_[0, :B_CFG], self.msix[0]
        for fn, args in ((conf1_access, (self.conf, self.space, CONFIG_DATA, 4, True, 0, False)),
                         (port_access, (self.conf, self.space, self.ports, self.kstate, self.port_counts, 0, 4,
                                         True, 0)),
                         (mmio_access, (self.page_slot, self.regs, self.bytes_, self.msix, self.notify_fd,
                                         self.mmio_counts, self.pend, 0, 4, True, 0)),
                         (bar0_access, (regs, by, mx, 0, 4, True, 0))):
            if hasattr(fn, "compile"):           # not under NUMBA_DISABLE_JIT
                fn.compile(tuple(numba.typeof(a) for a in args))

    # -- counters ---------------------------------------------------------------
    def _port_name(self, p):
        kind = int(self.ports[p, PT_KIND])
        rel = p - int(self.ports[p, PT_FIRST])
        if kind == PK_CONF1:
            return "conf1 address" if p < CONFIG_DATA else "conf1 data"
        if kind == PK_UART and rel < len(UART_REG_NAMES):
            return f"uart {UART_REG_NAMES[rel]}"
        if kind == PK_CMOS and rel < len(CMOS_REG_NAMES):
            return f"cmos {CMOS_REG_NAMES[rel]}"
        if kind == PK_RESET:
            return f"port {p:#x} (reset)"
        return f"port {p:#x}" + ("" if kind else " (unclaimed)")

    def vcpu_tables(self) -> tuple:
        """``tables`` for another vCPU's loop: every table shared except the
        port and MMIO access counters, which are its own (plain increments
        from two vCPUs at once would lose counts) and summed by
        ``access_counts``."""
        port_counts = np.zeros_like(self.port_counts)
        mmio_counts = np.zeros_like(self.mmio_counts)
        self._more_counts.append((port_counts, mmio_counts))
        return self.tables[:-2] + (port_counts, mmio_counts)

    def access_counts(self) -> list:
        """[(register name, accesses)], non-zero only, most first: every port
        (by handler register) and BAR0 register (device, then region or
        common-config field) the guest or a backend accessed, all vCPUs'."""
        port_counts, mmio_counts = self.port_counts.copy(), self.mmio_counts.copy()
        for p, m in self._more_counts:
            port_counts += p
            mmio_counts += m
        rows = [(self._port_name(int(p)), int(port_counts[p])) for p in np.flatnonzero(port_counts)]
        for slot, reg in zip(*np.nonzero(mmio_counts)):
            t = self.slots[slot] if slot < MAX_SLOTS else None
            name = f"{t.name} {M_NAMES[reg]}" if t is not None else "mmio (unclaimed)"
            rows.append((name, int(mmio_counts[slot, reg])))
        return sorted(rows, key=lambda r: -r[1])

    def bar_at(self, addr: int, size: int = 1):
        """``(transport, bar, offset)`` of the BAR holding ``addr`` .. ``addr
        + size - 1`` (only BAR0 exists), or None.  A lookup, no access."""
        t = self._pages.get(addr >> BAR0_SHIFT)
        if t is None or size < 1 or addr - t.bar0 + size > BAR0_SIZE:
            return None
        return t, 0, addr - t.bar0

    # -- eventfds ----------------------------------------------------------
    def ioeventfds(self) -> list:
        if self.notify_mode == "single":
            return []
        # Only what decodes: a device hidden under another's BAR0 (overlap
        # rule in _rebuild_decode) gets no notification there.
        return [(t.notify_gpa(q), 2, fd) for t in self.devices if self._pages.get(t.bar0 >> BAR0_SHIFT) is t
                for q, fd in enumerate(t.notify_fds)]

    def interrupts(self) -> list:
        return [(t.irq_line, t.irq_fd) for t in self.devices]

    def irq_pending(self, line: int) -> bool:
        return any(t.irq_line == line and t.isr[0] != 0 and not t.intx_disabled and not t.msix_enabled
                   for t in self.devices)

    def msi_routes(self) -> list:
        """``(eventfd, address, data)`` for every MSI-X vector of every
        device, always in the same order (a backend binds entry i to one
        interrupt route for good): the table entry's message, or address
        None while the function has MSI-X disabled.  A backend that cannot
        deliver MSI builds its bus with ``msix=False``: no device then has
        the capability and this list is empty."""
        out = []
        for t in self.devices:
            m = t.msix
            for v, fd in enumerate(t.vector_fds):
                if m[0, MX_ENABLED]:
                    addr = int(m[1 + v, MV_ADDR_HI]) << 32 | int(m[1 + v, MV_ADDR_LO])
                    out.append((fd, addr, int(m[1 + v, MV_DATA])))
                else:
                    out.append((fd, None, 0))
        return out

    def add_msi_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (under the bus lock) whenever ``msi_routes()``
        may have changed: a table entry of an unmasked vector written, a
        vector unmasked, MSI-X enabled or disabled.  It runs before the
        vector can send, so a backend's routes are current when it does."""
        self._msi_listeners.append(listener)

    def msi_changed(self) -> None:
        for listener in self._msi_listeners:
            listener()

    @staticmethod
    def state_schema(device_states: dict):
        """The fields of ``save_state()``; ``device_states``: each device
        kind's own ``STATE`` (the devices declare them; pci knows none)."""
        transports = OneOf("kind", {k: Transport.state_schema(v) for k, v in device_states.items()})
        return Record({"conf1_address": U(32), "config_space": List(Blob(PCI_CFG_SPACE_SIZE), MAX_SLOTS,
                                                                     min_len=MAX_SLOTS),
                       "devices": List(transports, MAX_SLOTS - 1)})

    def save_state(self) -> dict:
        """Config space, the conf1 address latch and every device's
        transport (``Transport.save_state``), by name."""
        with self._lock:
            return {"conf1_address": int(self.conf[C_ADDR]), "config_space": [blob(c.tobytes()) for c in self.cfg],
                    "devices": [t.save_state() for t in self.devices]}

    def load_state(self, st: dict) -> None:
        """Put back what ``save_state()`` returned on a bus with the same devices
        in the same slots; BAR decoding (and whoever listens to it) follows."""
        if not isinstance(st, dict) or not isinstance(st.get("devices"), list) or \
                len(st["devices"]) != len(self.devices):
            raise ValueError(f"snapshot has {len(st.get('devices') or []) if isinstance(st, dict) else 0} "
                             f"devices, this machine {len(self.devices)}")
        kinds = {t.device.kind: t.device.STATE for t in self.devices}
        saved_devices = st["devices"]          # each transport reads its own fields again
        st = check(self.state_schema(kinds), st, "bus")
        space = np.array([np.frombuffer(c, dtype=np.uint8) for c in st["config_space"]])
        # Only the writable bits may differ: the read-only ones (identity,
        # capabilities) are this launcher's, and a snapshot may not change
        # what the guest can write.
        if ((space ^ self.cfg) & ~self.wmask).any():
            raise ValueError("snapshot config space was built for other devices")
        with self._lock:
            self.conf[C_ADDR] = st["conf1_address"]
            self.cfg[...] = space
            for t, ts in zip(self.devices, saved_devices):
                t.load_state(ts)
                t.bar0 = read_le(self.cfg[t.slot], PCI_BASE_ADDRESS_0, 4) & ~(BAR0_SIZE - 1) & 0xFFFFFFFF
                t.command_written()
                if t.msix_vectors:
                    t.msix[0, MX_ENABLED], t.msix[0, MX_MASKED] = t.msix_control()
            self._rebuild_decode()
            self.msi_changed()          # the backend's routes from the restored tables
            # Last, with decoding and notify addresses in place: the queue
            # threads of the devices the driver had started.
            for t, ts in zip(self.devices, st["devices"]):
                if ts["active"]:
                    t._activate()

    def close(self) -> None:
        for t in self.devices:
            try:
                t.device.reset()
            finally:
                t.close()
