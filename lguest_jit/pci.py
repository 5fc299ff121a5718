"""PCI bus, host bridge, config space with permission masks, and the virtio
1.0 PCI modern transport (§4.1).

Everything the hypervisor backends and the devices need from PCI lives here.

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

``bus.run_vcpu(vcpu_fd, run_page, ctl) -> int``
    The compiled vCPU loop (hw.kvm calls it; see "Exit dispatch").

``bus.access_counts() -> list[tuple[str, int]]``
    Accesses by register ("conf1 data", "uart THR", "<device>
    common.queue_select", ...), non-zero only, most first (``--stats``).

``bus.close()``
    Resets every device (joins its threads) and closes the eventfds.

Device interface (``lguest_jit.devices`` subclass :class:`VirtioDevice`)
=======================================================================
``device_type``, ``name``, ``queue_max_sizes``, ``features``, ``config``
(uint8 array), ``config_write(offset, size, value) -> bool``,
``activate(ctx: QueueContext)``, ``reset()``.  See the class docstrings.
A device that changes ``config`` calls ``transport.config_changed()``.

Driver errors
=============
Every driver-conformance rule lguest enforces has an ``E_*`` code; the
``RULES`` table gives its text, virtio 1.0 section and what the device does
about it.  ``strict``: raise :class:`BadDriver` (``str()`` is
``"<device>: <rule> (§x.y)"``; the vCPU loop prints ``bad driver: ...`` and
stops).  Default: behave like a device — drop the bad access (or, for the
rules marked ``NEEDS_RESET``, set DEVICE_NEEDS_RESET and raise a config
interrupt), log the rule once per device, keep running.

MSI-X (PCI 3.0 §6.8, virtio 1.0 §4.1.5)
=======================================
With ``msix=True`` each device has an MSI-X capability (id 0x11, last in
the list) with one vector per queue plus one for configuration changes
(at most ``MSIX_MAX_VECTORS``): Message Control holds the table size - 1
(read-only) and the writable Enable (bit 15) and Function Mask (bit 14),
whose writes reach ``Transport.msix_control_written`` (hook H_MSIX); Table
and PBA are at ``MSIX_TABLE_OFF``/``MSIX_PBA_OFF`` in BAR0 (BIR 0), so
they move with it.  The state is ``bus.msix[slot]`` (= ``transport.msix``):
row 0 the function, row 1 + v entry v (vring's MX_*/MV_* fields).

* Table entries (address lo/hi, data, vector control) take aligned DWORD
  or QWORD accesses; anything else, entries past the table, PBA writes and
  reads past it break E_MSIX_ACCESS (dropped, reads 0).  Reset: every
  entry masked.  Address bits 1:0 and control bits 31:1 read 0.
* msix_config / queue_msix_vector store the vector; one the table lacks
  stores NO_VECTOR (E_MSIX; the driver reads it back and falls back).
  Device reset maps every event to NO_VECTOR; the table is PCI state and
  stays.
* Delivery (vring.raise_msix, from the queue threads and for config
  changes): MSI-X disabled -> ISR bit + INTx, as without the capability.
  Enabled -> no ISR bit, no INTx: the event's vector, or nothing for
  NO_VECTOR.  A masked vector or function sets the pending bit instead;
  clearing the mask sends it (§6.8.3.4).  Set and cleared by atomic
  exchange, so a raise racing an unmask sends exactly once.
* Routes first: clearing a mask bit (action A_MSIX_UNMASK), enabling or
  unmasking the function, or rewriting an unmasked entry (A_MSIX_ROUTE)
  calls the MSI listeners before the vector can send on the new message.

Implementation
==============
Config space is virtualized the vfio way: ``bus.space[slot, plane, offset]``
holds per byte the value (``P_CFG``), the writable bits (``P_WMASK``), which
handler has behaviour there (``P_HOOK``: BAR0, COMMAND, pci_cfg_data) and
the region (``P_REGION``: header or capability number, so accesses are split
into aligned chunks that never straddle a capability; an empty slot is all
"unused").  The tables are built per region when a device is added.  One
kernel, ``_conf1``, handles both conf1 ports; Python runs only the hooks.
BAR sizing needs no handler: BAR0's writable bits are its size mask, so
writing all-ones reads back the mask; unimplemented BARs and the ROM BAR
have no writable bits and stay 0.  BAR0 decodes wherever the guest puts it,
whatever COMMAND.MEMORY says (lguest's behaviour; Linux never relies on
decode being off).

BAR0 (``BAR0_SIZE`` bytes)::

    0x000  common configuration (0x38 bytes)        §4.1.4.3
    0x040  ISR status (1 byte, read-to-clear)        §4.1.4.5
    0x100  device-specific configuration            §4.1.4.6
    0x800  notify: per-queue 2-byte registers 4 apart, or one register
                                                    §4.1.4.4
    0x1000 MSI-X table (16 bytes per vector)        PCI 3.0 §6.8.2
    0x1800 MSI-X pending bit array (read-only)

``_bar_access`` does all of BAR0 from tables (field at each common-config
offset, its width) and two arrays per device: ``regs`` (row 0 device state,
row 1+q queue q's registers: queue_select just picks the row, which is the
per-queue save/restore) and ``bytes`` (ISR, then a copy of the device
config, refreshed by ``config_changed()``).  It returns an action code for
the few slow paths Python handles (reset, status log, DRIVER_OK,
queue_enable -> ``vring.setup_queue``, notify -> eventfd write, device
config writes) and an error code for the policy.

Threads: ``pio``/``mmio`` take a bus lock, so several vCPU threads may call
them.  Device threads only touch the ISR byte, the MSI-X pending bits,
``config_changed()`` and ``ctx.driver_error`` (which never take the bus lock, so a reset that joins
device threads under the lock cannot deadlock).  The ISR byte is updated
without an atomic read-and-clear: a device's OR racing a driver's ISR read
can lose one ISR bit (the eventfd still raises the interrupt).

Guest-side helpers ``conf1_address``/``conf1_read``/``conf1_write`` do what
Linux's pci_conf1_read/write do (tests, benchmarks).
"""
from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numba
import numpy as np
from numba import njit

from . import vring
from .hw.cmos import REG_NAMES as CMOS_REG_NAMES, cmos_access
from .hw.kvm import (KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_IRQ_WINDOW_OPEN,
                     KVM_EXIT_MMIO, KVM_RUN,
                     RUN_EXIT_REASON, RUN_IO_COUNT, RUN_IO_DATA_OFFSET, RUN_IO_DIRECTION, RUN_IO_PORT, RUN_IO_SIZE,
                     RUN_MMIO_DATA, RUN_MMIO_IS_WRITE, RUN_MMIO_LEN, RUN_MMIO_PHYS, V_EXITS, V_ERRNO, V_INTR, V_LIMIT,
                     V_MMIO, V_PIO, V_STOP, VCPU_EINTR, VCPU_ERRNO, VCPU_EXIT, VCPU_LIMIT, VCPU_STOPPED, assist)
from .hw.libc import EAGAIN, EINTR, sys_ioctl, sys_time, sys_write
from .hw.fields import Blob, Bool, Int, List, OneOf, Record, Str, U, blob, check
from .hw.memory import GuestMemory, get_le, ld_u8, ld_u16, ld_u32, ld_u64, put_le, st_u8, st_u16, st_u32, st_u64
from .hw.uart import REG_NAMES as UART_REG_NAMES, uart_access
from .vring import (ISR_CONFIG, MSIX_CTRL_MASKBIT, MV_ADDR_HI, MV_ADDR_LO, MV_CTRL, MV_DATA, MV_FD, MV_PENDING,
                    MX_ENABLED, MX_INTX_FD, MX_MASKED, MX_VECTORS, VIRTIO_MSI_NO_VECTOR)

# ---------------------------------------------------------------------------
# PCI constants

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
MAX_SLOTS = 32
PCI_CFG_SPACE_SIZE = 256   # config space of a conventional PCI function

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
# Bits a driver may flip; everything else in COMMAND reads 0.
COMMAND_WRITABLE = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                    | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)
PCI_STATUS_CAP_LIST = 0x10
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
# MSI-X capability (PCI 3.0 §6.8.2): id, next, Message Control, Table
# Offset/BIR, PBA Offset/BIR.
PCI_MSIX_FLAGS = 2
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_CAP_LEN = 12
PCI_MSIX_FLAGS_QSIZE = 0x07FF    # table size - 1, read-only
PCI_MSIX_FLAGS_MASKALL = 0x4000  # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000
MSIX_ENTRY_SIZE = 16             # address lo, address hi, data, vector control

# Host bridge identity: Red Hat's generic host bridge id, which no Linux
# quirk matches (an Intel id would pull in chipset quirks).
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008

# Virtio PCI (§4.1.2, §4.1.4)
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
VIRTIO_PCI_SUBSYS_DEVICE = 0x40
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# Device status bits (§2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# PCI class codes for each virtio device type (class, subclass, prog-if).

# ---------------------------------------------------------------------------
# BAR0 layout

BAR0_SIZE = 0x2000
BAR0_SHIFT = 13
COMMON_OFF = 0x000
COMMON_LEN = 0x38
ISR_OFF = 0x040
ISR_LEN = 1
DEVCFG_OFF = 0x100
DEVCFG_MAX = 0x700
NOTIFY_OFF = 0x800
NOTIFY_STRIDE = 4           # notify_off_multiplier in per-queue mode
MSIX_TABLE_OFF = 0x1000     # MSI-X table (16 bytes per vector), PCI 3.0 §6.8.2
MSIX_PBA_OFF = 0x1800       # MSI-X pending bit array
MAX_QUEUES = (MSIX_TABLE_OFF - NOTIFY_OFF) // NOTIFY_STRIDE
MSIX_MAX_VECTORS = (MSIX_PBA_OFF - MSIX_TABLE_OFF) // 16
# MSI-X state, one int64 array per device (``Bus.msix[slot]``): row 0 the
# function (MX_* fields), row 1 + v vector v (MV_* fields); the fields are
# vring's, whose queue threads deliver through it.
MSIX_FIELDS = 8
assert max(MX_VECTORS, MX_ENABLED, MX_MASKED, MX_INTX_FD, MV_FD, MV_PENDING) < MSIX_FIELDS
# A table DWORD's index in its entry is its MV_* field.
assert (MV_ADDR_LO, MV_ADDR_HI, MV_DATA, MV_CTRL) == (0, 1, 2, 3)

# Common configuration fields (§4.1.4.3).  64-bit fields are two 32-bit
# fields for the width rule (§4.1.3.1 lets the driver access halves).
F_DFSELECT, F_DFEATURE, F_GFSELECT, F_GFEATURE, F_MSIX, F_NUMQ, F_STATUS, F_GEN, \
    F_QSELECT, F_QSIZE, F_QMSIX, F_QENABLE, F_QNOTIFY_OFF, \
    F_QDESC_LO, F_QDESC_HI, F_QDRIVER_LO, F_QDRIVER_HI, F_QDEVICE_LO, F_QDEVICE_HI = range(19)
_FIELDS = (  # (offset, width)
    (0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1),
    (0x16, 2), (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2),
    (0x20, 4), (0x24, 4), (0x28, 4), (0x2C, 4), (0x30, 4), (0x34, 4),
)
FIELD_START = np.array([f[0] for f in _FIELDS], dtype=np.int64)
FIELD_WIDTH = np.array([f[1] for f in _FIELDS], dtype=np.int64)
FIELD_AT = np.zeros(COMMON_LEN, dtype=np.int64)
for _i, (_o, _w) in enumerate(_FIELDS):
    FIELD_AT[_o:_o + _w] = _i
COMMON_FIELD_NAMES = ("device_feature_select", "device_feature", "driver_feature_select", "driver_feature",
                      "msix_config", "num_queues", "device_status", "config_generation", "queue_select",
                      "queue_size", "queue_msix_vector", "queue_enable", "queue_notify_off",
                      "queue_desc_lo", "queue_desc_hi", "queue_driver_lo", "queue_driver_hi",
                      "queue_device_lo", "queue_device_hi")

# Device state (one int64 array per transport)
S_STATUS = 0
S_DFSELECT = 1
S_GFSELECT = 2
S_OFFER_LO = 3       # offered features, 32-bit halves (no int64 sign trouble)
S_OFFER_HI = 4
S_DRIVER_LO = 5      # accepted features
S_DRIVER_HI = 6
S_GENERATION = 7
S_QSELECT = 8
S_NUM_QUEUES = 9
S_FOK_UNREAD = 10    # FEATURES_OK written, status not read back since
S_SINGLE_NOTIFY = 11
S_CFG_LEN = 12
S_N_ACCESSES = 13
S_ISR_READS = 14     # ISR reads (an INTx driver's one extra exit per interrupt)
S_MSIX_CONFIG = 15   # msix_config: the configuration-change vector
S_FIELDS = 16
# Bytes the BAR0 kernel reads: the ISR (a view of it is what devices OR
# into), then a copy of the device config.
B_ISR = 0
B_CFG = 8

# Per-queue registers (rows 1.. of the same int64 array)
QC_SIZE = 0
QC_MAX = 1
QC_ENABLE = 2
QC_NOTIFY_OFF = 3
QC_DESC_LO = 4
QC_DESC_HI = 5
QC_DRIVER_LO = 6
QC_DRIVER_HI = 7
QC_DEVICE_LO = 8
QC_DEVICE_HI = 9
QC_MSIX = 10         # queue_msix_vector
QC_FIELDS = 11

# Slow-path actions returned by _bar_access
A_NONE = 0
A_RESET = 1
A_DRIVER_OK = 2
A_QUEUE_ENABLE = 3     # arg: queue index
A_NOTIFY = 4           # arg: queue index
A_CONFIG_WRITE = 5     # arg: offset in device config
A_STATUS = 6           # device_status accepted a new value (verbose log)
A_MSIX_UNMASK = 7      # arg: vector whose mask bit the driver clears (still set: see Transport._unmask)
A_MSIX_ROUTE = 8       # arg: vector; an unmasked vector's message changed
A_QUEUE_VECTOR = 9     # arg: queue; queue_msix_vector of an enabled queue changed

# ---------------------------------------------------------------------------
# Driver-conformance rules.  Kernels return the code; Python applies the
# policy.  IGNORE: the access was dropped.  PROCEED: it was performed (the
# device can live with it).  NEEDS_RESET: the device cannot work any more.

IGNORE, PROCEED, NEEDS_RESET = 0, 1, 2

E_WIDTH = 1
E_READ_ONLY = 2
E_ISR_WRITE = 3
E_FEATURE_BEFORE_DRIVER = 4
E_FEATURE_AFTER_FEATURES_OK = 5
E_FEATURE_NOT_OFFERED = 6
E_STATUS_CLEAR = 7
E_STATUS_TRANSITION = 8
E_FEATURES_OK_NOT_REREAD = 9
E_SETUP_BEFORE_FEATURES_OK = 10
E_ENABLE_AFTER_DRIVER_OK = 11
E_ENABLE_ZERO = 12
E_QUEUE_SIZE_VALUE = 13   # the register write; vring.E_QUEUE_SIZE is the layout check at enable
E_QUEUE_LIVE = 14
E_NOTIFY_EARLY = 15
E_NOTIFY_QUEUE = 16
E_MSIX = 17
E_BAR_RANGE = 18
E_CFG_WINDOW = 19
E_CONFIG_WRITE = 20
E_QUEUE_LAYOUT = 21
E_DEVICE = 22
E_FEATURE_READ_BEFORE_DRIVER = 23
E_DRIVER_OK_WITHOUT_FEATURES_OK = 24
E_MSIX_ACCESS = 25

RULES = {
    E_WIDTH: ("access width is not the field's natural width", "4.1.3.1", IGNORE),
    E_READ_ONLY: ("write to a read-only common configuration field "
                  "(device_feature, num_queues, config_generation, queue_notify_off)", "4.1.4.3.2", IGNORE),
    E_ISR_WRITE: ("write to the read-only ISR status", "4.1.4.5", IGNORE),
    E_FEATURE_BEFORE_DRIVER: ("feature write before the DRIVER status bit", "3.1.1", IGNORE),
    E_FEATURE_READ_BEFORE_DRIVER: ("feature read before the DRIVER status bit", "3.1.1", PROCEED),
    E_FEATURE_AFTER_FEATURES_OK: ("feature write after FEATURES_OK", "3.1.1", IGNORE),
    E_FEATURE_NOT_OFFERED: ("driver accepted a feature the device did not offer", "2.2.1", IGNORE),
    E_STATUS_CLEAR: ("driver cleared a device status bit", "2.1.1", IGNORE),
    E_STATUS_TRANSITION: ("unknown device status transition", "3.1.1", NEEDS_RESET),
    E_FEATURES_OK_NOT_REREAD: ("FEATURES_OK not re-read before queue setup or DRIVER_OK", "3.1.1", PROCEED),
    E_SETUP_BEFORE_FEATURES_OK: ("queue setup before FEATURES_OK", "3.1.1", IGNORE),
    E_ENABLE_AFTER_DRIVER_OK: ("queue enabled after DRIVER_OK", "3.1.1", IGNORE),
    E_ENABLE_ZERO: ("driver wrote 0 to queue_enable", "4.1.4.3.2", IGNORE),
    E_QUEUE_SIZE_VALUE: ("queue_size not a power of two, zero, or above the maximum", "4.1.4.3.2", IGNORE),
    E_QUEUE_LIVE: ("queue configuration written while the queue is enabled", "4.1.4.3.2", IGNORE),
    E_NOTIFY_EARLY: ("notification before DRIVER_OK", "3.1.1", IGNORE),
    E_NOTIFY_QUEUE: ("notification for a queue the device does not have", "4.1.4.4", IGNORE),
    E_MSIX: ("MSI-X vector beyond the device's MSI-X table (none without the capability): "
             "the event gets no vector and reads back NO_VECTOR", "4.1.5.1.2", PROCEED),
    E_MSIX_ACCESS: ("MSI-X table or PBA access that is not an aligned DWORD or QWORD, outside the table "
                    "or PBA, or a write to the read-only PBA (PCI 3.0 §6.8.2)", "4.1.4.5", IGNORE),
    E_BAR_RANGE: ("access outside the virtio structures in BAR0", "4.1.4", IGNORE),
    E_CFG_WINDOW: ("VIRTIO_PCI_CAP_PCI_CFG window with an invalid bar, offset or length", "4.1.4.7.2", IGNORE),
    E_CONFIG_WRITE: ("write to a read-only device configuration field", "4.1.4.6", IGNORE),
    E_QUEUE_LAYOUT: ("queue enabled with an invalid layout", "2.4", NEEDS_RESET),
    E_DEVICE: ("device found a malformed request", "2.4", NEEDS_RESET),
    E_DRIVER_OK_WITHOUT_FEATURES_OK: ("DRIVER_OK set but the device refused the features (no FEATURES_OK)",
                                      "3.1.1", IGNORE),
}


class BadDriver(Exception):
    """A driver broke a virtio rule under the strict policy.  ``str()`` is
    ``"<device>: <rule> (§x.y)"``; ``.detail`` has the offending values."""

    def __init__(self, device: str, code: int, rule: str, section: str, detail: str = ""):
        self.device, self.code, self.rule, self.section, self.detail = device, code, rule, section, detail
        super().__init__(f"{device}: {rule} (§{section})")


# ---------------------------------------------------------------------------
# Devices


@dataclass
class QueueContext:
    """What a device gets at DRIVER_OK (see VirtioDevice.activate)."""
    mem: GuestMemory
    features: int                      # negotiated, all 64 bits
    queues: list                       # vring state array per queue, None if not enabled
    notify_fds: list                   # one eventfd per queue (blocking)
    irq_fd: int                        # write 1 to raise the interrupt
    isr: np.ndarray                    # uint8[1]; OR 1 (used buffer) or 2 (config) into it first
    driver_error: Callable[[int, str], None]   # (queue_index, message): applies the policy
    name: str = ""
    # The device's MSI-X state (Bus.msix[slot]); queue threads pass it to
    # vring as ``irq`` instead of irq_fd, so each interrupt goes to the
    # queue's vector while MSI-X is enabled (INTx otherwise).
    msix: Optional[np.ndarray] = None


class VirtioDevice:
    """What a device gives the transport.  Subclasses set the attributes and
    override ``activate``/``reset`` (and ``config_write`` if any config field
    is writable).

    ``device_type``: virtio device id (1 net, 2 block, 3 console, 4 rng).
    ``queue_max_sizes``: one maximum (a power of two, <= 32768) per queue.
    ``features``: offered feature bits; the transport adds VIRTIO_F_VERSION_1.
    ``config``: uint8 array, the device-specific configuration (empty: no
    DEVICE_CFG capability).  After changing it at run time, call
    ``self.transport.config_changed()``.
    """
    device_type: int = 0
    kind: str = "virtio"             # the device registry's name (lguest_jit.devices.DEVICES)
    name: str = "virtio"
    pci_class: tuple = (0xFF, 0x00)  # PCI class and subclass in config space
    queue_max_sizes: tuple = ()
    features: int = 0
    config: np.ndarray = np.zeros(0, dtype=np.uint8)
    transport: "Transport" = None
    STATE = Record({})               # the fields save_state() returns (hw.fields)

    def save_state(self) -> dict:
        """The device's own state beyond the transport's, as ``STATE``'s
        named fields (a snapshot; the device is paused)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Put back ``save_state()``, every field read through ``STATE``."""
        check(self.STATE, state, self.name)

    def config_write(self, offset: int, size: int, value: int) -> bool:
        """The driver wrote ``size`` bytes of device config at ``offset``.
        Return False when the field is read-only (a driver error)."""
        return False

    def activate(self, ctx: QueueContext) -> None:
        """DRIVER_OK: start serving the enabled queues."""

    def reset(self) -> None:
        """Stop and join the queue threads; forget negotiated state."""


class IrqAllocator:
    """Interrupt lines for one machine.  Lines used by legacy PC devices
    (timer 0, keyboard 1, cascade 2, COM1 4, RTC 8, mouse 12, FPU 13, IDE 14)
    are never handed out; when the free ones run out, lines are shared
    (PCI INTx is level-triggered and shareable)."""

    ORDER = (5, 9, 10, 11, 3, 6, 7, 15)

    def __init__(self, order=ORDER):
        self._order = tuple(order)
        self._next = 0

    def allocate(self) -> int:
        line = self._order[self._next % len(self._order)]
        self._next += 1
        return line


# ---------------------------------------------------------------------------
# Config space kernel

C_ADDR = 0        # the CONFIG_ADDRESS register
C_FIELDS = 2

H_NONE = 0
H_BAR0 = 1
H_COMMAND = 2
H_CFG_DATA = 3    # pci_cfg_data: reads and writes go through to BAR0
H_MSIX = 4        # MSI-X Message Control: Enable, Function Mask

REGION_UNUSED = 0xFF

# Planes of the per-bus config array space[slot, plane, offset]
P_CFG = 0         # current values
P_WMASK = 1       # writable bits
P_HOOK = 2        # H_* handler id
P_REGION = 3      # 0 header, n capability n, REGION_UNUSED; an empty slot is all unused
P_PLANES = 4


@njit(nogil=True, cache=True, inline='always')
def _size_mask(size):
    if size >= 4:
        return 0xFFFFFFFF
    return (1 << (8 * size)) - 1


@njit(nogil=True, cache=True, inline='always')
def _conf1(conf, space, port, size, is_write, value, hooks_done):
    """One access to the conf1 ports; the caller guarantees the access lies
    inside 0xCF8-0xCFB or 0xCFC-0xCFF.  ``space[slot, P_*, offset]`` holds
    the four per-byte tables.  Returns (result, hooks): ``hooks`` is a bit
    set of H_* handlers for the bytes written.  A read touching pci_cfg_data
    returns hooks=1<<H_CFG_DATA and does nothing unless ``hooks_done`` (the
    caller performs the window read and calls again)."""
    smask = _size_mask(size)
    if port < CONFIG_DATA:
        shift = 8 * (port - CONFIG_ADDRESS)
        if is_write:
            m = smask << shift
            conf[C_ADDR] = (conf[C_ADDR] & ~m & 0xFFFFFFFF) | ((value << shift) & m)
            return 0, 0
        return (conf[C_ADDR] >> shift) & smask, 0
    a = conf[C_ADDR]
    ones = 0 if is_write else smask
    # Configuration cycles need the enable bit, bus 0 and function 0.
    if (a & 0x80000000) == 0 or ((a >> 16) & 0xFF) != 0 or ((a >> 8) & 7) != 0:
        return ones, 0
    slot = (a >> 11) & 31
    if space[slot, P_REGION, 0] != 0:      # no header: empty slot
        return ones, 0
    base = (a & 0xFC) + (port - CONFIG_DATA)
    if not is_write and not hooks_done:
        for i in range(size):
            if space[slot, P_HOOK, base + i] == H_CFG_DATA:
                return 0, 1 << H_CFG_DATA
    result = 0
    hooks = 0
    done = 0
    while done < size:
        pos = base + done
        # Chunk: no further than the dword end or the end of this region,
        # then the largest naturally aligned size that fits (vfio).
        n = 1
        r = space[slot, P_REGION, pos]
        while n < size - done and (pos + n) % 4 != 0 and space[slot, P_REGION, pos + n] == r:
            n += 1
        if n >= 4 and pos % 4 == 0:
            n = 4
        elif n >= 2 and pos % 2 == 0:
            n = 2
        else:
            n = 1
        for i in range(n):
            b = pos + i
            if is_write:
                w = int(space[slot, P_WMASK, b])
                if w != 0:
                    v = (value >> (8 * (done + i))) & 0xFF
                    space[slot, P_CFG, b] = (int(space[slot, P_CFG, b]) & ~w & 0xFF) | (v & w)
                    h = int(space[slot, P_HOOK, b])
                    if h != 0:
                        hooks |= 1 << h
            else:
                result |= int(space[slot, P_CFG, b]) << (8 * (done + i))
        done += n
    return result, hooks


# ---------------------------------------------------------------------------
# BAR0 kernel


@njit(nogil=True, cache=True, inline='always')
def _get_le(arr, off, size):
    v = 0
    for i in range(size):
        v |= int(arr[off + i]) << (8 * i)
    return v


@njit(nogil=True, cache=True, inline='always')
def _queue_setup_check(regs, q):
    """Rules shared by every queue-configuration write; 0 when allowed."""
    status = regs[0, S_STATUS]
    if (status & FEATURES_OK) == 0:
        return E_SETUP_BEFORE_FEATURES_OK
    if regs[1 + q, QC_ENABLE] != 0:
        return E_QUEUE_LIVE
    if regs[0, S_FOK_UNREAD] != 0:
        return E_FEATURES_OK_NOT_REREAD   # reported, but the write proceeds
    return 0


@njit(nogil=True, cache=True, inline='always')
def _common(regs, msix, off, size, is_write, value):
    fid = FIELD_AT[off]
    if FIELD_START[fid] != off or FIELD_WIDTH[fid] != size:
        return 0, A_NONE, 0, E_WIDTH
    status = regs[0, S_STATUS]
    q = regs[0, S_QSELECT]
    have_q = q < regs[0, S_NUM_QUEUES]
    if not is_write:
        if fid == F_DFSELECT:
            return regs[0, S_DFSELECT], A_NONE, 0, 0
        if fid == F_DFEATURE:
            sel = regs[0, S_DFSELECT]
            v = regs[0, S_OFFER_LO] if sel == 0 else (regs[0, S_OFFER_HI] if sel == 1 else 0)
            return v, A_NONE, 0, (E_FEATURE_READ_BEFORE_DRIVER if (status & DRIVER) == 0 else 0)
        if fid == F_GFSELECT:
            return regs[0, S_GFSELECT], A_NONE, 0, 0
        if fid == F_GFEATURE:
            sel = regs[0, S_GFSELECT]
            v = regs[0, S_DRIVER_LO] if sel == 0 else (regs[0, S_DRIVER_HI] if sel == 1 else 0)
            return v, A_NONE, 0, (E_FEATURE_READ_BEFORE_DRIVER if (status & DRIVER) == 0 else 0)
        if fid == F_MSIX:
            return regs[0, S_MSIX_CONFIG], A_NONE, 0, 0
        if fid == F_QMSIX:
            return (regs[1 + q, QC_MSIX] if have_q else VIRTIO_MSI_NO_VECTOR), A_NONE, 0, 0
        if fid == F_NUMQ:
            return regs[0, S_NUM_QUEUES], A_NONE, 0, 0
        if fid == F_STATUS:
            regs[0, S_FOK_UNREAD] = 0   # the driver has now seen FEATURES_OK (or its absence)
            return status, A_NONE, 0, 0
        if fid == F_GEN:
            return regs[0, S_GENERATION] & 0xFF, A_NONE, 0, 0
        if fid == F_QSELECT:
            return q, A_NONE, 0, 0
        if not have_q:
            return 0, A_NONE, 0, 0   # §4.1.4.3.1: queue_size reads 0 for no queue
        if fid == F_QSIZE:
            return regs[1 + q, QC_SIZE], A_NONE, 0, 0
        if fid == F_QENABLE:
            return regs[1 + q, QC_ENABLE], A_NONE, 0, 0
        if fid == F_QNOTIFY_OFF:
            return regs[1 + q, QC_NOTIFY_OFF], A_NONE, 0, 0
        # 64-bit queue addresses: fields F_QDESC_LO .. F_QDEVICE_HI map onto
        # QC_DESC_LO .. QC_DEVICE_HI in order.
        return regs[1 + q, QC_DESC_LO + fid - F_QDESC_LO], A_NONE, 0, 0

    value &= _size_mask(size)
    if fid == F_DFSELECT:
        regs[0, S_DFSELECT] = value
        return 0, A_NONE, 0, 0
    if fid == F_GFSELECT or fid == F_GFEATURE:
        if (status & DRIVER) == 0:
            return 0, A_NONE, 0, E_FEATURE_BEFORE_DRIVER
        if (status & FEATURES_OK) != 0:
            return 0, A_NONE, 0, E_FEATURE_AFTER_FEATURES_OK
        if fid == F_GFSELECT:
            regs[0, S_GFSELECT] = value
            return 0, A_NONE, 0, 0
        sel = regs[0, S_GFSELECT]
        offered = regs[0, S_OFFER_LO] if sel == 0 else (regs[0, S_OFFER_HI] if sel == 1 else 0)
        err = E_FEATURE_NOT_OFFERED if (value & ~offered) != 0 else 0
        if sel == 0:
            regs[0, S_DRIVER_LO] = value & offered
        elif sel == 1:
            regs[0, S_DRIVER_HI] = value & offered
        return 0, A_NONE, 0, err
    if fid == F_DFEATURE or fid == F_NUMQ or fid == F_GEN or fid == F_QNOTIFY_OFF:
        return 0, A_NONE, 0, E_READ_ONLY
    if fid == F_MSIX or fid == F_QMSIX:
        # §4.1.5.1.2.1: a vector the table does not have maps the event to
        # nothing, and the driver reads NO_VECTOR back (its cue to fall
        # back); "no vector" is always acceptable.
        vec = value
        err = 0
        if value != VIRTIO_MSI_NO_VECTOR and value >= msix[0, MX_VECTORS]:
            vec = VIRTIO_MSI_NO_VECTOR
            err = E_MSIX
        if fid == F_MSIX:
            regs[0, S_MSIX_CONFIG] = vec
            return 0, A_NONE, 0, err
        if not have_q:
            return 0, A_NONE, 0, err
        regs[1 + q, QC_MSIX] = vec
        # A running queue thread reads its vector from its vring state.
        return 0, (A_QUEUE_VECTOR if regs[1 + q, QC_ENABLE] != 0 else A_NONE), q, err
    if fid == F_STATUS:
        return _status_write(regs, value)
    if fid == F_QSELECT:
        regs[0, S_QSELECT] = value
        return 0, A_NONE, 0, 0
    if not have_q:
        return 0, A_NONE, 0, 0   # no such queue: nothing to configure
    if fid == F_QENABLE:
        if value == 0:
            return 0, A_NONE, 0, E_ENABLE_ZERO
        if (status & DRIVER_OK) != 0:
            return 0, A_NONE, 0, E_ENABLE_AFTER_DRIVER_OK
        err = _queue_setup_check(regs, q)
        if err != 0 and err != E_FEATURES_OK_NOT_REREAD:
            return 0, A_NONE, 0, err
        return 0, A_QUEUE_ENABLE, q, err
    err = _queue_setup_check(regs, q)
    if err != 0 and err != E_FEATURES_OK_NOT_REREAD:
        return 0, A_NONE, 0, err
    if fid == F_QSIZE:
        if value == 0 or (value & (value - 1)) != 0 or value > regs[1 + q, QC_MAX]:
            return 0, A_NONE, 0, E_QUEUE_SIZE_VALUE
        regs[1 + q, QC_SIZE] = value
        return 0, A_NONE, 0, err
    regs[1 + q, QC_DESC_LO + fid - F_QDESC_LO] = value
    return 0, A_NONE, 0, err


@njit(nogil=True, cache=True, inline='always')
def _status_write(regs, value):
    """device_status write (§2.1, §3.1.1).  DEVICE_NEEDS_RESET belongs to the
    device (a driver writes back what it read), FAILED may be set any time."""
    new = value & 0xFF
    if new == 0:
        return 0, A_RESET, 0, 0
    old = regs[0, S_STATUS]
    old_drv = old & ~DEVICE_NEEDS_RESET & 0xFF
    new_drv = new & ~DEVICE_NEEDS_RESET & 0xFF
    if (old_drv & ~new_drv) != 0:
        return 0, A_NONE, 0, E_STATUS_CLEAR
    added = new_drv & ~old_drv
    if added == 0:
        return 0, A_NONE, 0, 0
    seq = new_drv & ~FAILED
    # The result must be a prefix of ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
    if not (seq == ACKNOWLEDGE or seq == ACKNOWLEDGE | DRIVER or seq == ACKNOWLEDGE | DRIVER | FEATURES_OK
            or seq == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK):
        return 0, A_NONE, 0, E_STATUS_TRANSITION
    err = 0
    if (added & FEATURES_OK) != 0:
        # A modern device refuses FEATURES_OK without VERSION_1 (§6.1):
        # the driver sees the bit missing when it re-reads.
        if (regs[0, S_DRIVER_HI] & 1) == 0:
            added &= ~FEATURES_OK
        regs[0, S_FOK_UNREAD] = 1
    if (added & DRIVER_OK) != 0 and ((old | added) & FEATURES_OK) == 0:
        # §3.1.1: DRIVER_OK only follows accepted features; a refused
        # feature set (§2.2.3) leaves the device unactivated.
        added &= ~DRIVER_OK
        err = E_DRIVER_OK_WITHOUT_FEATURES_OK
    regs[0, S_STATUS] = (old | added) & 0xFF
    if (added & DRIVER_OK) != 0:
        if regs[0, S_FOK_UNREAD] != 0:
            err = E_FEATURES_OK_NOT_REREAD
        return 0, A_DRIVER_OK, 0, err
    return 0, A_STATUS, 0, err


@njit(nogil=True, cache=True, inline='always')
def _bar_access(regs, bytes_, msix, off, size, is_write, value):
    """One access to BAR0 at ``off`` (0 <= off < BAR0_SIZE), size 1/2/4.
    ``regs``: row 0 the device state (S_*), row 1+q queue q (QC_*);
    ``bytes_``: ISR then the device config; ``msix``: the MSI-X state
    (table and PBA live at MSIX_TABLE_OFF / MSIX_PBA_OFF).  Returns
    (result, action, arg, error)."""
    regs[0, S_N_ACCESSES] += 1
    if off < COMMON_OFF + COMMON_LEN:
        if off + size > COMMON_OFF + COMMON_LEN:
            return 0, A_NONE, 0, E_BAR_RANGE
        return _common(regs, msix, off - COMMON_OFF, size, is_write, value)
    if off >= MSIX_TABLE_OFF:
        return _msix_access(msix, off, size, is_write, value)
    if off >= NOTIFY_OFF:
        nq = regs[0, S_NUM_QUEUES]
        if regs[0, S_SINGLE_NOTIFY] != 0:
            if off >= NOTIFY_OFF + 2:
                return 0, A_NONE, 0, E_BAR_RANGE
            q = value & 0xFFFF
        else:
            rel = off - NOTIFY_OFF
            if rel >= nq * NOTIFY_STRIDE or (rel % NOTIFY_STRIDE) >= 2:
                return 0, A_NONE, 0, E_BAR_RANGE
            q = rel // NOTIFY_STRIDE
        if (off - NOTIFY_OFF) % NOTIFY_STRIDE != 0 or size != 2:
            return 0, A_NONE, 0, E_WIDTH
        if not is_write:
            return 0, A_NONE, 0, 0
        if (regs[0, S_STATUS] & DRIVER_OK) == 0:
            return 0, A_NONE, 0, E_NOTIFY_EARLY
        if q >= nq:
            return 0, A_NONE, 0, E_NOTIFY_QUEUE
        return 0, A_NOTIFY, q, 0
    if off >= DEVCFG_OFF:
        rel = off - DEVCFG_OFF
        if rel + size > regs[0, S_CFG_LEN]:
            return 0, A_NONE, 0, E_BAR_RANGE
        if is_write:
            return 0, A_CONFIG_WRITE, rel, 0
        return _get_le(bytes_, B_CFG + rel, size), A_NONE, 0, 0
    if off == ISR_OFF:
        if is_write:
            return 0, A_NONE, 0, E_ISR_WRITE
        if size != 1:
            return 0, A_NONE, 0, E_WIDTH
        regs[0, S_ISR_READS] += 1
        # §4.1.4.5.1: reading ISR clears it.
        v = int(bytes_[B_ISR])
        bytes_[B_ISR] = 0
        return v, A_NONE, 0, 0
    return 0, A_NONE, 0, E_BAR_RANGE


@njit(nogil=True, cache=True)
def _msix_access(msix, off, size, is_write, value):
    """The MSI-X table and PBA (PCI 3.0 §6.8.2), a DWORD at a time (QWORDs
    arrive as two).  Reset state: every vector masked, nothing pending."""
    nvec = msix[0, MX_VECTORS]
    if nvec == 0:
        return 0, A_NONE, 0, E_BAR_RANGE          # no capability: nothing lives here
    if size != 4 or (off & 3) != 0:
        return 0, A_NONE, 0, E_MSIX_ACCESS        # "aligned full DWORD or QWORD" only
    if off >= MSIX_PBA_OFF:
        rel = off - MSIX_PBA_OFF
        if is_write or rel >= 8 * ((nvec + 63) // 64):
            return 0, A_NONE, 0, E_MSIX_ACCESS    # the PBA is read-only
        first = 8 * rel
        v = 0
        for i in range(32):
            if first + i < nvec and msix[1 + first + i, MV_PENDING] != 0:
                v |= 1 << i
        return v, A_NONE, 0, 0
    rel = off - MSIX_TABLE_OFF
    vec = rel // MSIX_ENTRY_SIZE
    if vec >= nvec:
        return 0, A_NONE, 0, E_MSIX_ACCESS
    field = (rel // 4) % 4                       # MV_ADDR_LO .. MV_CTRL
    row = msix[1 + vec]
    if not is_write:
        return row[field], A_NONE, 0, 0
    value &= 0xFFFFFFFF
    if field == MV_CTRL:
        new = value & MSIX_CTRL_MASKBIT            # bits 31:1 are reserved: read 0
        if new == 0 and (row[MV_CTRL] & MSIX_CTRL_MASKBIT) != 0:
            return 0, A_MSIX_UNMASK, vec, 0
        row[MV_CTRL] = new
        return 0, A_NONE, 0, 0
    if field == MV_ADDR_LO:
        value &= 0xFFFFFFFC                        # DWORD-aligned: bits 1:0 read 0
    row[field] = value
    if msix[0, MX_ENABLED] != 0 and msix[0, MX_MASKED] == 0 and (row[MV_CTRL] & MSIX_CTRL_MASKBIT) == 0:
        return 0, A_MSIX_ROUTE, vec, 0            # an unmasked vector changed (undefined; follow it)
    return 0, A_NONE, 0, 0


# ---------------------------------------------------------------------------
# Exit dispatch: flat tables and the compiled vCPU loop
#
# Every port and MMIO access -- a KVM exit in the compiled vCPU loop, or a
# ``bus.pio``/``bus.mmio`` call from Python (lguest backend, tests, the
# harness) -- goes through ``_port_access``/``_mmio_access`` over the bus's
# tables (``Bus.tables``, a tuple of arrays, T_* order).  They finish
# everything a compiled handler can answer; the rest they hand to Python
# with nothing done that cannot be repeated (ST_PYTHON: redo the access in
# Python) or with ``_bar_access``'s result left in the pending record
# (ST_BAR_SLOW: ``Transport._slow`` finishes it).  The loop lives here, not
# in hw, because it dispatches into PCI kernels; hw/kvm.py owns KVM_RUN's
# protocol (V_* control fields, VCPU_* codes) and calls ``bus.run_vcpu``.

# Port table columns (``ports[port, field]``, int32: one port's fields in one cache line)
PT_KIND, PT_FIRST, PT_LAST, PT_ROW = range(4)
PK_NONE, PK_PYTHON, PK_CONF1, PK_UART, PK_CMOS, PK_RESET = range(6)
PORT_KINDS = {"python": PK_PYTHON, "conf1": PK_CONF1, "uart": PK_UART, "cmos": PK_CMOS, "reset": PK_RESET}
KSTATE_ROWS = 4           # compiled port devices with state (UART, CMOS)
KSTATE_WIDTH = 258        # >= hw.uart.U_FIELDS, hw.cmos.C_FIELDS
RESET_VALUE = 0xFE        # pulse the reset line (8042 command)

# Access status
ST_DONE, ST_PYTHON, ST_BAR_SLOW = 0, 1, 2
# Loop codes past VCPU_*: an access Python must finish before re-entering
R_SLOW_PIO = 16
R_SLOW_MMIO = 17

# Pending record (``pend``, int64): what Python needs to finish an access
PD_INDEX, PD_SLOT, PD_OFF, PD_SIZE, PD_WRITE, PD_VALUE, PD_R, PD_ACTION, PD_ARG, PD_ERR, PD_STATUS, PD_ONE = \
    range(12)
PD_FIELDS = 12

# MMIO counter columns per slot: the common-config field ids, then these
M_ISR = len(_FIELDS)
M_DEVCFG = M_ISR + 1
M_NOTIFY = M_ISR + 2
M_MSIX_TABLE = M_ISR + 3
M_MSIX_PBA = M_ISR + 4
M_OTHER = M_ISR + 5
M_REGS = M_ISR + 6
M_NAMES = tuple(f"common.{n}" for n in COMMON_FIELD_NAMES) + ("isr", "device_cfg", "notify", "msix.table",
                                                             "msix.pba", "other")
PAGE_SLOTS = 1 << (32 - BAR0_SHIFT)      # every BAR0-sized page below 4 GiB

# Tables tuple order
T_CONF, T_SPACE, T_PORTS, T_KSTATE, T_PAGE_SLOT, T_REGS, T_BYTES, T_MSIX, T_NOTIFY_FD, T_PORT_COUNTS, \
    T_MMIO_COUNTS, T_PEND = range(12)


@njit(nogil=True, cache=True, inline='always')
def _port_one(conf, space, ports, kstate, kind, port, size, is_write, value):
    """One access to one handler's ports; (result, ST_*)."""
    ones = 0 if is_write else _size_mask(size)
    if kind == PK_NONE:
        return ones, ST_DONE
    if kind == PK_CONF1:
        r, hooks = _conf1(conf, space, port, size, is_write, value & 0xFFFFFFFF, False)
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
def _port_access(conf, space, ports, kstate, counts, port, size, is_write, value):
    """A port access (0 <= port <= 0xFFFF, size 1/2/4): (result, ST_*).
    Unclaimed ports read all-ones; an access running past the end of a
    claimed range is split into bytes, as the chipset would."""
    counts[port] += 1
    kind = ports[port, PT_KIND]
    if kind == PK_NONE:
        return (0 if is_write else _size_mask(size)), ST_DONE
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
def _mmio_access(page_slot, regs, bytes_, msix, notify_fd, counts, pend, addr, size, is_write, value):
    """An MMIO access (size 1/2/4/8): (result, ST_*).  Addresses in no BAR0
    read all-ones (-1 for 8 bytes) and ignore writes; BAR0 goes to
    ``_bar_access``, whose notify action becomes an eventfd write here."""
    slot = 0
    if 0 <= addr < (1 << 32):
        slot = page_slot[addr >> BAR0_SHIFT]
    if slot == 0:
        counts[MAX_SLOTS, M_OTHER] += 1
        if is_write:
            return 0, ST_DONE
        return (-1 if size == 8 else _size_mask(size)), ST_DONE
    off = addr & (BAR0_SIZE - 1)
    counts[slot, _mmio_reg(off)] += 1
    if size > 4 or off + size > BAR0_SIZE:
        pend[PD_STATUS] = ST_PYTHON
        return 0, ST_PYTHON                # 64-bit halves and range errors: Python
    r, action, arg, err = _bar_access(regs[slot], bytes_[slot], msix[slot], off, size, is_write, value & 0xFFFFFFFF)
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


@njit(nogil=True, cache=True, inline='always')
def _load(buf, off, size):
    if size == 1:
        return ld_u8(buf, off)
    if size == 2:
        return ld_u16(buf, off)
    if size == 4:
        return ld_u32(buf, off)
    return ld_u64(buf, off)


@njit(nogil=True, cache=True, inline='always')
def _store(buf, off, size, value):
    if size == 1:
        st_u8(buf, off, value & 0xFF)
    elif size == 2:
        st_u16(buf, off, value & 0xFFFF)
    elif size == 4:
        st_u32(buf, off, value & 0xFFFFFFFF)
    else:
        st_u64(buf, off, value)


@njit(nogil=True, cache=True, inline='always')
def handle_exit(run, ctl, conf, space, ports, kstate, port_counts, page_slot, regs, bytes_, msix, notify_fd,
                mmio_counts, pend):
    """Handle the exit described in the kvm_run page ``run`` (uint8) with the
    bus's tables (``Bus.tables``, unpacked once by the caller: each array
    passed across a call costs tens of ns), counting it in ``ctl`` (hw.kvm
    V_* fields).  Returns 0
    when the vCPU may run on, a VCPU_* code for an exit only Python
    handles, or R_SLOW_PIO/R_SLOW_MMIO for an access Python must finish
    (``pend`` says where).  Public so a benchmark can drive it with a
    kvm_run-shaped page exactly as the vCPU loop does."""
    reason = ld_u32(run, RUN_EXIT_REASON)
    if reason == KVM_EXIT_IO:
        ctl[V_PIO] += 1
        size = ld_u8(run, RUN_IO_SIZE)
        port = ld_u16(run, RUN_IO_PORT)
        count = ld_u32(run, RUN_IO_COUNT)
        data = ld_u64(run, RUN_IO_DATA_OFFSET)
        if (size != 1 and size != 2 and size != 4) or data < 0 or data + count * size > run.size:
            return VCPU_EXIT               # not what KVM sends: Python reports it
        is_write = ld_u8(run, RUN_IO_DIRECTION) == KVM_EXIT_IO_OUT
        for i in range(count):
            at = data + i * size
            v = _load(run, at, size) if is_write else 0
            r, st = _port_access(conf, space, ports, kstate, port_counts, port, size, is_write, v)
            if st != ST_DONE:
                pend[PD_INDEX] = i
                return R_SLOW_PIO
            if not is_write:
                _store(run, at, size, r)
        return 0
    if reason == KVM_EXIT_MMIO:
        ctl[V_MMIO] += 1
        ln = ld_u32(run, RUN_MMIO_LEN)
        if ln != 1 and ln != 2 and ln != 4 and ln != 8:
            return VCPU_EXIT
        addr = ld_u64(run, RUN_MMIO_PHYS)
        is_write = ld_u8(run, RUN_MMIO_IS_WRITE) != 0
        v = _load(run, RUN_MMIO_DATA, ln) if is_write else 0
        r, st = _mmio_access(page_slot, regs, bytes_, msix, notify_fd, mmio_counts, pend, addr, ln, is_write, v)
        if st != ST_DONE:
            return R_SLOW_MMIO
        if not is_write:
            _store(run, RUN_MMIO_DATA, ln, r)
        return 0
    if reason == KVM_EXIT_INTR:
        ctl[V_INTR] += 1
        return 0
    if reason == KVM_EXIT_IRQ_WINDOW_OPEN:
        return 0
    if reason == KVM_EXIT_INTERNAL_ERROR:
        return assist(run, ctl)            # int3/fwait here; anything else VCPU_EXIT
    return VCPU_EXIT


# _nrt=False: no reference counting inside the loop.  Every array it
# touches is owned by the caller for the whole call and the loop allocates
# nothing, so the counts would only cost: with them, the inlined dispatch
# layers did ~30 atomic increments/decrements per exit, over 200 ns of a
# ~260 ns unclaimed-port exit (perf, bench pci's driver); without, ~20 ns.
# Callees that are not inlined (uart/cmos, the assists) keep their own
# counting, balanced within each call.
@njit(nogil=True, cache=True, _nrt=False)
def _vcpu_loop(fd, run, ctl, tb):
    """KVM_RUN on vCPU ``fd`` until an exit needs Python (see handle_exit),
    ctl[V_STOP] is set, a signal interrupts KVM_RUN or ctl[V_LIMIT] exits
    were handled.  nogil: device threads run meanwhile."""
    conf, space, ports, kstate, page_slot, regs, bytes_, msix, notify_fd, port_counts, mmio_counts, pend = tb
    while True:
        if ctl[V_STOP] != 0:
            return VCPU_STOPPED
        rc = sys_ioctl(fd, KVM_RUN, 0)
        if rc < 0:
            if rc == -EINTR:
                return VCPU_EINTR
            if rc == -EAGAIN:
                continue
            ctl[V_ERRNO] = -rc
            return VCPU_ERRNO
        ctl[V_EXITS] += 1
        code = handle_exit(run, ctl, conf, space, ports, kstate, port_counts, page_slot, regs, bytes_, msix,
                           notify_fd, mmio_counts, pend)
        if code != 0:
            return code
        if ctl[V_EXITS] == ctl[V_LIMIT]:
            return VCPU_LIMIT


def _from_disk_cache(kernel) -> bool:
    """True when ``kernel`` was loaded from Numba's disk cache in this
    process (False when compiled, or under NUMBA_DISABLE_JIT)."""
    stats = getattr(kernel, "stats", None)
    return stats is not None and sum(stats.cache_hits.values()) > 0


# ---------------------------------------------------------------------------
# Config space construction (the per-region permission tables)


class _ConfigBuilder:
    """Fills one slot's cfg/wmask/hook/region rows region by region."""

    def __init__(self, cfg, wmask, hook, region):
        self.cfg, self.wmask, self.hook, self.region = cfg, wmask, hook, region
        cfg[:] = 0
        wmask[:] = 0
        hook[:] = H_NONE
        region[:] = REGION_UNUSED
        region[:0x40] = 0
        self._caps = []

    def set(self, off, width, val, writable=0, hook=H_NONE):
        put_le(self.cfg, off, width, val)
        put_le(self.wmask, off, width, writable)
        if hook != H_NONE:
            self.hook[off:off + width] = hook

    def header(self, vendor, device, revision, cls, subcls, progif, sub_vendor, sub_device, pin, line,
               bar0_size=0, bar0=0):
        self.set(PCI_VENDOR_ID, 2, vendor)
        self.set(PCI_DEVICE_ID, 2, device)
        self.set(PCI_COMMAND, 2, 0, COMMAND_WRITABLE, H_COMMAND)
        self.set(PCI_STATUS, 2, 0)
        self.set(PCI_REVISION_ID, 1, revision)
        self.set(PCI_CLASS_PROG, 1, progif)
        self.set(PCI_CLASS_DEVICE, 2, (cls << 8) | subcls)
        # Scratch registers Linux may program (pci_set_cacheline_size,
        # pcibios_set_master): harmless to let them stick, as vfio does.
        self.set(PCI_CACHE_LINE_SIZE, 1, 0, 0xFF)
        self.set(PCI_LATENCY_TIMER, 1, 0, 0xFF)
        self.set(PCI_HEADER_TYPE, 1, 0)
        if bar0_size:
            # 32-bit non-prefetchable memory BAR: the writable bits are the
            # address bits, so an all-ones write reads back the size mask.
            self.set(PCI_BASE_ADDRESS_0, 4, bar0, (~(bar0_size - 1)) & 0xFFFFFFFF, H_BAR0)
        # BAR1-5 and the ROM BAR: no writable bits, so they read 0 forever.
        self.set(PCI_SUBSYSTEM_VENDOR_ID, 2, sub_vendor)
        self.set(PCI_SUBSYSTEM_ID, 2, sub_device)
        self.set(PCI_INTERRUPT_LINE, 1, line, 0xFF)
        self.set(PCI_INTERRUPT_PIN, 1, pin)

    def vendor_cap(self, off, cfg_type, bar_off, length, extra=b"", window=False):
        """A virtio vendor capability (struct virtio_pci_cap, §4.1.4) at ``off``."""
        size = 16 + len(extra)
        idx = len(self._caps) + 1
        self.region[off:off + size] = idx
        self.set(off + 0, 1, PCI_CAP_ID_VNDR)
        self.set(off + 2, 1, size)
        self.set(off + 3, 1, cfg_type)
        self.set(off + 4, 1, 0)            # bar
        self.set(off + 8, 4, bar_off)
        self.set(off + 12, 4, length)
        for i, b in enumerate(extra):
            self.cfg[off + 16 + i] = b
        if window:
            # VIRTIO_PCI_CAP_PCI_CFG: the driver programs bar/offset/length
            # and moves data through pci_cfg_data (§4.1.4.7).
            self.wmask[off + 4] = 0xFF
            put_le(self.wmask, off + 8, 4, 0xFFFFFFFF)
            put_le(self.wmask, off + 12, 4, 0xFFFFFFFF)
            put_le(self.wmask, off + 16, 4, 0xFFFFFFFF)
            self.hook[off + 16:off + 20] = H_CFG_DATA
        self._link(off)
        return off + size

    def _link(self, off):
        if self._caps:
            self.cfg[self._caps[-1] + 1] = off      # link from the previous cap
        else:
            self.cfg[PCI_CAPABILITY_LIST] = off
            put_le(self.cfg, PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        self._caps.append(off)

    def msix_cap(self, off, vectors):
        """The MSI-X capability at ``off``: ``vectors`` entries, table and PBA
        in BAR0.  Enable and Function Mask are the writable bits (hooked)."""
        self.region[off:off + PCI_MSIX_CAP_LEN] = len(self._caps) + 1
        self.set(off + 0, 1, PCI_CAP_ID_MSIX)
        self.set(off + PCI_MSIX_FLAGS, 2, vectors - 1, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL, H_MSIX)
        self.set(off + PCI_MSIX_TABLE, 4, MSIX_TABLE_OFF | 0)      # BIR 0
        self.set(off + PCI_MSIX_PBA, 4, MSIX_PBA_OFF | 0)
        self._link(off)
        return off + PCI_MSIX_CAP_LEN


# ---------------------------------------------------------------------------
# Transport


class Transport:
    """One virtio device on the bus: its config-space slot and BAR0."""

    def __init__(self, bus: "Bus", dev: VirtioDevice, slot: int, bar0: int, irq_line: int):
        nq = len(dev.queue_max_sizes)
        if nq == 0 or nq > MAX_QUEUES:
            raise ValueError(f"{dev.name}: a device needs 1..{MAX_QUEUES} queues, got {nq}")
        for m in dev.queue_max_sizes:
            if m <= 0 or m & (m - 1) or m > vring.MAX_QUEUE_SIZE:
                raise ValueError(f"{dev.name}: queue maximum {m} is not a power of two <= {vring.MAX_QUEUE_SIZE}")
        config = np.ascontiguousarray(dev.config, dtype=np.uint8)
        if len(config) > DEVCFG_MAX:
            raise ValueError(f"{dev.name}: device config of {len(config)} bytes exceeds {DEVCFG_MAX}")
        if dev.features >= 1 << 64 or dev.features < 0:
            raise ValueError(f"{dev.name}: features must be a 64-bit mask")
        self.bus, self.device, self.slot, self.irq_line = bus, dev, slot, irq_line
        self.name = dev.name
        self.bar0 = bar0
        self.single_notify = bus.notify_mode == "single"
        self.config = config
        self.offered = int(dev.features) | (1 << vring.VIRTIO_F_VERSION_1)
        # Two arrays per device keep the kernel call cheap (each array
        # argument costs more than the work of a register access).
        # Views of the bus's per-slot arrays, which the compiled dispatch indexes by slot.
        self.regs = bus.regs[slot, :1 + nq]
        self.regs[:] = 0
        self.st = self.regs[0]
        self.qs = self.regs[1:]
        self.bytes = bus.bytes_[slot, :B_CFG + len(config)]
        self.bytes[:] = 0
        self.isr = self.bytes[B_ISR:B_ISR + 1]
        self.msix = bus.msix[slot]
        self.bytes[B_CFG:] = config
        self.queues = [vring.new_queue() for _ in range(nq)]
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nq)]
        bus.notify_fd[slot, :nq] = self.notify_fds
        self.irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
        # MSI-X: one vector per queue plus the configuration vector, each
        # with its eventfd; all masked, nothing pending (PCI 3.0 §6.8.2.9).
        self.msix_vectors = min(nq + 1, MSIX_MAX_VECTORS) if bus.offer_msix else 0
        self.vector_fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(self.msix_vectors)]
        self.msix[:] = 0
        self.msix[0, MX_VECTORS] = self.msix_vectors
        self.msix[0, MX_INTX_FD] = self.irq_fd
        for v, fd in enumerate(self.vector_fds):
            self.msix[1 + v, MV_CTRL] = MSIX_CTRL_MASKBIT
            self.msix[1 + v, MV_FD] = fd
        self._scratch = np.zeros(1, np.uint64)
        self.intx_disabled = False
        self.active = False
        self._logged = set()
        self._lock = threading.Lock()   # state changes from device threads
        self.st[S_NUM_QUEUES] = nq
        self.st[S_SINGLE_NOTIFY] = int(self.single_notify)
        self.st[S_CFG_LEN] = len(config)
        self.st[S_OFFER_LO] = self.offered & 0xFFFFFFFF
        self.st[S_OFFER_HI] = self.offered >> 32
        self._reset_registers()
        dev.transport = self
        self._build_config_space()

    # -- config space ------------------------------------------------------
    def _build_config_space(self):
        b = self.bus
        s = self.slot
        cb = _ConfigBuilder(b.cfg[s], b.wmask[s], b.hook[s], b.region[s])
        cls, sub = self.device.pci_class
        cb.header(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + self.device.device_type, 1, cls, sub, 0,
                  VIRTIO_PCI_VENDOR, VIRTIO_PCI_SUBSYS_DEVICE, pin=1, line=self.irq_line,
                  bar0_size=BAR0_SIZE, bar0=self.bar0)
        nq = len(self.queues)
        off = 0x40
        off = cb.vendor_cap(off, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, COMMON_LEN)
        if self.single_notify:
            mult, nlen = 0, 2
        else:
            mult, nlen = NOTIFY_STRIDE, NOTIFY_STRIDE * nq
        off = cb.vendor_cap(off, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, nlen, extra=mult.to_bytes(4, "little"))
        off = cb.vendor_cap(off, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, ISR_LEN)
        if len(self.config):
            off = cb.vendor_cap(off, VIRTIO_PCI_CAP_DEVICE_CFG, DEVCFG_OFF, len(self.config))
        self.cfg_window = off
        off = cb.vendor_cap(off, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, extra=bytes(4), window=True)
        self.msix_cap = 0
        if self.msix_vectors:
            self.msix_cap = off
            cb.msix_cap(off, self.msix_vectors)

    def config_space(self) -> np.ndarray:
        """This slot's 256 config bytes (a view; for tests and dumps)."""
        return self.bus.cfg[self.slot]

    # -- state -------------------------------------------------------------
    def _reset_registers(self):
        st, qs = self.st, self.qs
        for i in (S_STATUS, S_DFSELECT, S_GFSELECT, S_DRIVER_LO, S_DRIVER_HI, S_QSELECT, S_FOK_UNREAD):
            st[i] = 0
        # The vector mapping is virtio state (reset); the MSI-X table and
        # its enable bits are PCI function state (kept).
        st[S_MSIX_CONFIG] = VIRTIO_MSI_NO_VECTOR
        qs[:] = 0
        for q, m in enumerate(self.device.queue_max_sizes):
            qs[q, QC_MAX] = m
            qs[q, QC_SIZE] = m
            qs[q, QC_NOTIFY_OFF] = 0 if self.single_notify else q
            qs[q, QC_MSIX] = VIRTIO_MSI_NO_VECTOR
        self.isr[0] = 0

    @property
    def status(self) -> int:
        return int(self.st[S_STATUS])

    @property
    def features(self) -> int:
        """Negotiated features (what the driver accepted)."""
        return int(self.st[S_DRIVER_HI]) << 32 | int(self.st[S_DRIVER_LO])

    def notify_gpa(self, q: int) -> int:
        return self.bar0 + NOTIFY_OFF + (0 if self.single_notify else NOTIFY_STRIDE * q)

    # -- interrupts --------------------------------------------------------
    def raise_irq(self, bit: int) -> None:
        """§4.1.5.3-4: MSI-X disabled: set the ISR bit, then raise the line.
        Enabled: a configuration change (bit 2) goes to msix_config's vector."""
        vector = int(self.st[S_MSIX_CONFIG]) if bit == ISR_CONFIG else VIRTIO_MSI_NO_VECTOR
        vring.raise_msix(self.isr, self.msix, np.zeros(1, np.uint64), vector, bit)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix[0, MX_ENABLED])

    def interrupt_stats(self) -> dict:
        """For --stats: how the driver takes interrupts, and its ISR reads
        (each one an exit MSI-X saves)."""
        mode = "msix" if self.msix_enabled else "intx"
        return {"mode": mode, "vectors": self.msix_vectors, "isr_reads": int(self.st[S_ISR_READS])}

    def msix_control(self) -> tuple[int, int]:
        """(Enable, Function Mask) as config space's Message Control has them."""
        ctl = get_le(self.bus.cfg[self.slot], self.msix_cap + PCI_MSIX_FLAGS, 2)
        return int(bool(ctl & PCI_MSIX_FLAGS_ENABLE)), int(bool(ctl & PCI_MSIX_FLAGS_MASKALL))

    def msix_control_written(self):
        """Message Control written: Enable and Function Mask (PCI 3.0
        §6.8.2.3).  When vectors become deliverable the backend's routes are
        refreshed first, then the function unmasked, then what is pending
        sent (§6.8.3.4), so no message goes out on a stale route."""
        enable, masked = self.msix_control()
        m = self.msix
        was_live = m[0, MX_ENABLED] and not m[0, MX_MASKED]
        if self.bus.log is not None and enable != m[0, MX_ENABLED]:
            self.bus.log(f"{self.name}: MSI-X {'enabled' if enable else 'disabled'}")
        if enable and not masked:
            if not was_live:
                # Hold messages as pending bits until the routes are current.
                m[0, MX_MASKED] = 1
                m[0, MX_ENABLED] = 1
                self.bus.msi_changed()
                m[0, MX_MASKED] = 0
                for v in range(self.msix_vectors):
                    if not m[1 + v, MV_CTRL] & MSIX_CTRL_MASKBIT:
                        vring.msix_send_pending(m, v, self._scratch)
            return
        changed = enable != m[0, MX_ENABLED]
        m[0, MX_MASKED] = masked
        m[0, MX_ENABLED] = enable
        if changed:
            self.bus.msi_changed()

    def _unmask(self, v):
        """The driver cleared vector ``v``'s mask bit: route, unmask, then
        send the pending message (the kernel left the bit set for this)."""
        m = self.msix
        live = m[0, MX_ENABLED] and not m[0, MX_MASKED]
        if live:
            self.bus.msi_changed()
        m[1 + v, MV_CTRL] = 0
        if live:
            vring.msix_send_pending(m, v, self._scratch)

    def _refresh_config(self):
        cfg = np.asarray(self.device.config, dtype=np.uint8)
        if len(cfg) != len(self.config):
            raise ValueError(f"{self.name}: device config changed size ({len(self.config)} -> {len(cfg)} bytes)")
        self.bytes[B_CFG:] = cfg

    def config_changed(self) -> None:
        """The device changed its config: new generation, config interrupt."""
        self._refresh_config()
        with self._lock:
            self.st[S_GENERATION] = (self.st[S_GENERATION] + 1) & 0xFF
        self.raise_irq(2)

    # -- policy ------------------------------------------------------------
    def driver_error(self, code: int, detail: str = "", rule: str | None = None, *, in_thread=False):
        text, section, severity = RULES[code]
        if rule is not None:
            text = rule
        bus = self.bus
        if bus.strict:
            err = BadDriver(self.name, code, text, section, detail)
            if in_thread and bus.fatal is not None:
                bus.fatal(str(err))
                return
            raise err
        if severity == NEEDS_RESET:
            self.needs_reset()
        if code not in self._logged:
            self._logged.add(code)
            if bus.log is not None:
                what = "device needs reset" if severity == NEEDS_RESET else "ignored" \
                    if severity == IGNORE else "allowed"
                bus.log(f"{self.name}: driver error: {text} (§{section}){': ' + detail if detail else ''} "
                        f"[{what}; further reports of this rule suppressed]")

    def needs_reset(self):
        """§2.1.2: DEVICE_NEEDS_RESET plus a configuration change interrupt."""
        with self._lock:
            if self.st[S_STATUS] & DEVICE_NEEDS_RESET:
                return
            self.st[S_STATUS] |= DEVICE_NEEDS_RESET
        self.raise_irq(2)

    def _thread_driver_error(self, queue_index: int, message: str) -> None:
        self.driver_error(E_DEVICE, f"queue {queue_index}", rule=message, in_thread=True)

    # -- BAR0 --------------------------------------------------------------
    def bar_access(self, off: int, size: int, is_write: bool, value: int) -> int:
        """Access BAR0 at offset ``off`` (the bus has checked it lies in BAR0)."""
        if size == 8:
            return self._bar_access64(off, is_write, value)
        r, action, arg, err = _bar_access(self.regs, self.bytes, self.msix, off, size, is_write, value & 0xFFFFFFFF)
        if action == A_NONE and err == 0:
            return r
        return self._slow(off, size, is_write, value, r, action, arg, err)

    def _bar_access64(self, off, is_write, value):
        # Only the 64-bit queue addresses and the MSI-X table and PBA
        # (aligned QWORDs, PCI 3.0 §6.8.2) have a natural 8-byte access.
        msix = off >= MSIX_TABLE_OFF and self.msix_vectors
        if off in (0x20, 0x28, 0x30) or (msix and off % 8 == 0):
            lo = self.bar_access(off, 4, is_write, value & 0xFFFFFFFF)
            hi = self.bar_access(off + 4, 4, is_write, (value >> 32) & 0xFFFFFFFF)
            return 0 if is_write else lo | hi << 32
        self.driver_error(E_MSIX_ACCESS if msix else E_WIDTH, f"8-byte access at BAR0+{off:#x}")
        return 0

    def _slow(self, off, size, is_write, value, r, action, arg, err):
        log = self.bus.log
        if err:
            self.driver_error(err, self._describe(off, size, is_write, value))
        if action == A_NOTIFY:
            os.eventfd_write(self.notify_fds[arg], 1)
        elif action == A_RESET:
            self.reset()
        elif action == A_DRIVER_OK:
            if log is not None:
                log(f"{self.name}: device status -> {self.status:#x} (DRIVER_OK)")
            self._activate()
        elif action == A_QUEUE_ENABLE:
            self._enable_queue(arg)
        elif action == A_CONFIG_WRITE:
            if not self.device.config_write(arg, size, value & ((1 << 8 * size) - 1)):
                self.driver_error(E_CONFIG_WRITE, f"offset {arg:#x} size {size}")
            self._refresh_config()
        elif action == A_STATUS and log is not None:
            log(f"{self.name}: device status -> {self.status:#x}")
        elif action == A_MSIX_UNMASK:
            self._unmask(arg)
        elif action == A_MSIX_ROUTE:
            self.bus.msi_changed()
        elif action == A_QUEUE_VECTOR:
            self.queues[arg][vring.Q_VECTOR] = self.qs[arg, QC_MSIX]
        return 0 if is_write else r

    def _describe(self, off, size, is_write, value):
        where = f"BAR0+{off:#x}"
        if off < COMMON_LEN:
            where = COMMON_FIELD_NAMES[FIELD_AT[off]] + (f"+{off - FIELD_START[FIELD_AT[off]]}"
                                                         if off != FIELD_START[FIELD_AT[off]] else "")
        op = f"{size}-byte write of {value:#x}" if is_write else f"{size}-byte read"
        return f"{op} at {where} (status {self.status:#x})"

    def _enable_queue(self, q):
        row = self.qs[q]
        desc = int(row[QC_DESC_HI]) << 32 | int(row[QC_DESC_LO])
        avail = int(row[QC_DRIVER_HI]) << 32 | int(row[QC_DRIVER_LO])
        used = int(row[QC_DEVICE_HI]) << 32 | int(row[QC_DEVICE_LO])
        code = vring.setup_queue(self.queues[q], self.bus.mem.size, int(row[QC_SIZE]), int(row[QC_MAX]),
                                 desc, avail, used, self.features)
        if code != vring.OK:
            self.driver_error(E_QUEUE_LAYOUT, f"queue {q}: {vring.error_message(code)}",
                              rule=f"queue enabled with an invalid layout: {vring.error_message(code)}")
            return
        row[QC_ENABLE] = 1
        self.queues[q][vring.Q_VECTOR] = row[QC_MSIX]
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: queue {q} enabled: size {int(row[QC_SIZE])} desc {desc:#x} "
                         f"avail {avail:#x} used {used:#x}")

    def _activate(self):
        if self.active:
            return
        self.active = True
        queues = [self.queues[q] if self.qs[q, QC_ENABLE] else None for q in range(len(self.queues))]
        ctx = QueueContext(mem=self.bus.mem, features=self.features, queues=queues,
                           notify_fds=list(self.notify_fds), irq_fd=self.irq_fd, isr=self.isr,
                           driver_error=self._thread_driver_error, name=self.name, msix=self.msix)
        self.device.activate(ctx)

    def reset(self):
        """device_status = 0 (§4.1.4.3.1) and launcher exit."""
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: reset")
        self.device.reset()
        self.active = False
        with self._lock:
            self._reset_registers()
        for fd in self.notify_fds:
            _drain(fd)
        _drain(self.irq_fd)

    # -- config-space hooks ------------------------------------------------
    def _window(self):
        cfg = self.bus.cfg[self.slot]
        w = self.cfg_window
        bar = int(cfg[w + 4])
        offset = get_le(cfg, w + 8, 4)
        length = get_le(cfg, w + 12, 4)
        ok = (bar == 0 and length in (1, 2, 4) and offset % length == 0 and offset + length <= BAR0_SIZE)
        return ok, bar, offset, length

    def window_read(self):
        ok, bar, offset, length = self._window()
        if not ok:
            self.driver_error(E_CFG_WINDOW, f"bar {bar} offset {offset:#x} length {length}")
            return
        v = self.bar_access(offset, length, False, 0)
        put_le(self.bus.cfg[self.slot], self.cfg_window + 16, 4, v)
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: window read {v:#x} from bar {bar} offset {offset:#x} len {length}")

    def window_write(self):
        ok, bar, offset, length = self._window()
        if not ok:
            self.driver_error(E_CFG_WINDOW, f"bar {bar} offset {offset:#x} length {length}")
            return
        v = get_le(self.bus.cfg[self.slot], self.cfg_window + 16, length)
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: window write {v:#x} to bar {bar} offset {offset:#x} len {length}")
        self.bar_access(offset, length, True, v)

    def command_written(self):
        cmd = get_le(self.bus.cfg[self.slot], PCI_COMMAND, 2)
        self.intx_disabled = bool(cmd & PCI_COMMAND_INTX_DISABLE)

    # -- snapshots ---------------------------------------------------------
    # What a snapshot holds of a transport, by name (``state_schema``).
    REGISTERS = {"status": S_STATUS, "device_feature_select": S_DFSELECT, "driver_feature_select": S_GFSELECT,
                 "offered_lo": S_OFFER_LO, "offered_hi": S_OFFER_HI, "driver_features_lo": S_DRIVER_LO,
                 "driver_features_hi": S_DRIVER_HI, "config_generation": S_GENERATION, "queue_select": S_QSELECT,
                 "num_queues": S_NUM_QUEUES, "features_ok_unread": S_FOK_UNREAD, "single_notify": S_SINGLE_NOTIFY,
                 "config_len": S_CFG_LEN, "accesses": S_N_ACCESSES, "isr_reads": S_ISR_READS,
                 "msix_config": S_MSIX_CONFIG}
    QUEUE_REGISTERS = {"size": QC_SIZE, "max": QC_MAX, "enable": QC_ENABLE, "notify_off": QC_NOTIFY_OFF,
                       "desc_lo": QC_DESC_LO, "desc_hi": QC_DESC_HI, "driver_lo": QC_DRIVER_LO,
                       "driver_hi": QC_DRIVER_HI, "device_lo": QC_DEVICE_LO, "device_hi": QC_DEVICE_HI,
                       "msix_vector": QC_MSIX}
    # Registers only this launcher sets: a snapshot must agree with them.
    _FIXED = ("num_queues", "single_notify", "config_len", "offered_lo", "offered_hi")
    _FIXED_Q = ("max", "notify_off")

    @classmethod
    def state_schema(cls, device_state):
        """The fields of ``save_state()`` for a device whose own state is
        ``device_state`` (its ``STATE``)."""
        regs = {name: U(32) for name in cls.REGISTERS}
        regs.update(status=U(8), queue_select=U(16), accesses=U(62), isr_reads=U(62))
        queue = Record({"registers": Record({name: U(32) for name in cls.QUEUE_REGISTERS}),
                        "ring": vring.queue_state_schema()}, optional=("ring",))
        vector = Record({"addr_lo": U(32), "addr_hi": U(32), "data": U(32), "masked": Bool(), "pending": Bool()})
        return Record({"kind": Str(16), "name": Str(64), "slot": Int(1, MAX_SLOTS - 1), "active": Bool(),
                       "registers": Record(regs), "queues": List(queue, MAX_QUEUES, min_len=1),
                       "isr": U(8), "config": Blob(max_len=DEVCFG_MAX), "msix": List(vector, MSIX_MAX_VECTORS),
                       "device": device_state})

    def save_state(self) -> dict:
        """Everything the driver configured, by name (a snapshot; the caller
        has paused the device so the queues are still)."""
        n = self.msix_vectors
        return {"kind": self.device.kind, "name": self.name, "slot": self.slot, "active": self.active,
                "registers": {name: int(self.st[i]) for name, i in self.REGISTERS.items()},
                "queues": [{"registers": {name: int(self.qs[k, i]) for name, i in self.QUEUE_REGISTERS.items()},
                            "ring": vring.queue_state(q) if self.qs[k, QC_ENABLE] else None}
                           for k, q in enumerate(self.queues)],
                "isr": int(self.isr[0]), "config": blob(self.bytes[B_CFG:].tobytes()),
                "msix": [{"addr_lo": int(r[MV_ADDR_LO]), "addr_hi": int(r[MV_ADDR_HI]), "data": int(r[MV_DATA]),
                          "masked": bool(r[MV_CTRL] & MSIX_CTRL_MASKBIT), "pending": bool(r[MV_PENDING])}
                         for r in self.msix[1:1 + n]],
                "device": self.device.save_state()}

    def load_state(self, st: dict) -> None:
        """Put back what ``save_state()`` returned, on a transport built for the
        same device (``Bus.load_state`` then restarts the active ones).  A
        snapshot is input from a file: every field is read through
        ``state_schema`` and what the kernels index with or trust is
        checked against this transport (ValueError names what does not fit)."""
        st = check(self.state_schema(self.device.STATE), st, self.name)
        if st["kind"] != self.device.kind or st["name"] != self.name or st["slot"] != self.slot:
            raise ValueError(f"snapshot of {st['name']!r} in slot {st['slot']} does not match {self.name!r} "
                             f"in slot {self.slot}")
        regs, queues = st["registers"], st["queues"]
        if len(queues) != len(self.queues):
            raise ValueError(f"{self.name}: snapshot has {len(queues)} queues, the device {len(self.queues)}")
        if any(regs[f] != self.st[self.REGISTERS[f]] for f in self._FIXED) or \
                any(qs["registers"][f] != self.qs[k, self.QUEUE_REGISTERS[f]]
                    for k, qs in enumerate(queues) for f in self._FIXED_Q) or \
                len(st["config"]) != len(self.config) or len(st["msix"]) != self.msix_vectors:
            raise ValueError(f"{self.name}: the snapshot's device has other queues, features or config")
        for k, qs in enumerate(queues):
            if qs["registers"]["enable"] and qs["ring"] is None:
                raise ValueError(f"{self.name}: snapshot queue {k} is enabled and has no ring state")
        self.device.load_state(st["device"])
        for name, i in self.REGISTERS.items():
            self.st[i] = regs[name]
        for k, qs in enumerate(queues):
            for name, i in self.QUEUE_REGISTERS.items():
                self.qs[k, i] = qs["registers"][name]
        self.isr[0] = st["isr"]
        self.bytes[B_CFG:] = np.frombuffer(st["config"], dtype=np.uint8)
        # MSI-X: the table and the pending bits only.  The table size and the
        # eventfds (MX_VECTORS, MX_INTX_FD, MV_FD) are this process's, and the
        # function's Enable/Mask follow config space (Bus.load_state).
        for v, row in enumerate(st["msix"], start=1):
            self.msix[v, MV_ADDR_LO], self.msix[v, MV_ADDR_HI] = row["addr_lo"], row["addr_hi"]
            self.msix[v, MV_DATA] = row["data"]
            self.msix[v, MV_CTRL] = MSIX_CTRL_MASKBIT if row["masked"] else 0
            self.msix[v, MV_PENDING] = int(row["pending"])
        for i, (q, qs) in enumerate(zip(self.queues, queues)):
            if not self.qs[i, QC_ENABLE]:
                q[:] = 0
                continue
            code = vring.restore_queue(q, qs["ring"], self.bus.mem.size, int(self.qs[i, QC_MAX]))
            if code != vring.OK:
                raise ValueError(f"{self.name}: snapshot queue {i}: {vring.error_message(code)}")
            q[vring.Q_VECTOR] = self.qs[i, QC_MSIX]       # raise_msix checks it against the table size

    def close(self):
        self.bus.notify_fd[self.slot, :] = -1
        for fd in self.notify_fds + [self.irq_fd] + self.vector_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.notify_fds = []
        self.vector_fds = []
        self.irq_fd = -1


def _drain(fd):
    try:
        while select.select([fd], [], [], 0)[0]:
            os.eventfd_read(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Bus


class _HostBridge:
    name = "host bridge"

    def window_read(self):
        pass

    def window_write(self):
        pass

    def command_written(self):
        pass

    def msix_control_written(self):
        pass


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
        self.pend = np.zeros(PD_FIELDS, dtype=np.int64)
        self._warming = None               # the thread loading the Python-side kernels (run_vcpu)
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
        bridge = _ConfigBuilder(self.cfg[0], self.wmask[0], self.hook[0], self.region[0])
        bridge.header(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0, 0x06, 0x00, 0, 0, 0, pin=0, line=0)
        self.slots[0] = _HostBridge()
        self.tables = (self.conf, self.space, self.ports, self.kstate, self.page_slot, self.regs, self.bytes_,
                       self.msix, self.notify_fd, self.port_counts, self.mmio_counts, self.pend)
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
            r, st = _port_access(self.conf, self.space, self.ports, self.kstate, self.port_counts, port, size,
                                 is_write, value & 0xFFFFFFFF)
        if st == ST_DONE:
            return int(r)
        return self._pio_python(port, size, is_write, value)

    def _pio_python(self, port, size, is_write, value):
        # What the compiled dispatch hands back: Python-only handlers, conf1
        # hooks, the reset port, splits touching those.
        ent = self._ports.get(port)
        if ent is None:
            return 0 if is_write else (1 << 8 * size) - 1
        if port + size - 1 > ent[1]:
            return self._split_pio(port, size, is_write, value)
        return ent[0](port, size, is_write, value)

    def _split_pio(self, port, size, is_write, value):
        # An access running off the end of a device's ports: byte by byte,
        # as the chipset would split it.
        r = 0
        for i in range(size):
            r |= self._pio_python((port + i) & 0xFFFF, 1, is_write, (value >> 8 * i) & 0xFF) << 8 * i
        return 0 if is_write else r

    def _conf1_port(self, port, size, is_write, value):
        with self._lock:
            r, hooks = _conf1(self.conf, self.space, port, size, is_write, value & 0xFFFFFFFF, False)
            if hooks == 0:
                return r
            target = self.slots[(int(self.conf[C_ADDR]) >> 11) & 31]
            if not is_write:
                target.window_read()
                r, _ = _conf1(self.conf, self.space, port, size, False, 0, True)
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
        new = get_le(self.cfg[t.slot], PCI_BASE_ADDRESS_0, 4) & ~(BAR0_SIZE - 1) & 0xFFFFFFFF
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
        for page in self._pages:
            self.page_slot[page] = 0
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

    # -- MMIO --------------------------------------------------------------
    def mmio(self, addr: int, size: int, is_write: bool, value: int) -> int:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO access size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= addr < 1 << 32:
            return 0 if is_write else (1 << 8 * size) - 1
        with self._lock:
            r, st = _mmio_access(self.page_slot, self.regs, self.bytes_, self.msix, self.notify_fd, self.mmio_counts,
                                 self.pend, addr, size, is_write, value & 0xFFFFFFFF)
            if st == ST_BAR_SLOW:
                return self._bar_slow(value)
        if st == ST_DONE:
            return int(r) & ((1 << 8 * size) - 1)
        return self._mmio_python(addr, size, is_write, value)

    def _bar_slow(self, value):
        # _bar_access's result is in the pending record; the transport
        # applies the policy and runs the action (under the bus lock).
        p = self.pend
        t = self.slots[int(p[PD_SLOT])]
        return t._slow(int(p[PD_OFF]), int(p[PD_SIZE]), bool(p[PD_WRITE]), value, int(p[PD_R]),
                       int(p[PD_ACTION]), int(p[PD_ARG]), int(p[PD_ERR]))

    def _mmio_python(self, addr, size, is_write, value):
        # 8-byte accesses and accesses running off the end of BAR0.
        t = self._pages.get(addr >> BAR0_SHIFT)
        if t is None:
            return 0 if is_write else (1 << 8 * size) - 1
        off = addr - t.bar0
        with self._lock:
            if off + size > BAR0_SIZE:
                t.driver_error(E_BAR_RANGE, f"{size}-byte access at BAR0+{off:#x}")
                return 0
            return t.bar_access(off, size, is_write, value)

    # -- the compiled vCPU loop --------------------------------------------------
    def run_vcpu(self, vcpu_fd: int, run: np.ndarray, ctl: np.ndarray) -> int:
        """Run KVM vCPU ``vcpu_fd`` (``run``: its kvm_run page as uint8,
        ``ctl``: hw.kvm's V_* control array) in the compiled loop until it
        returns a hw.kvm VCPU_* code; accesses only Python can finish are
        finished here, and the loop re-entered."""
        tb = self.tables
        while True:
            code = _vcpu_loop(vcpu_fd, run, ctl, tb)
            if self._warming is None:
                # The kernels Python calls on a slow exit load now, beside the
                # guest: off the path to the first KVM_RUN (~0.1 s of a
                # start), and the loop runs without the GIL while they do.
                # (hw.kvm's first call returns at once, to load the loop.)
                self._warming = threading.Thread(target=self._compile_python_paths, name="bus-jit-load",
                                                 daemon=True)
                self._warming.start()
                if not _from_disk_cache(_vcpu_loop):
                    # A cold cache: they compile (seconds), and would hold
                    # Numba's compiler lock against the device threads'
                    # compiles mid-run.  Done now, as the loop just was.
                    self._warming.join()
            if code == R_SLOW_PIO:
                self._finish_pio(run)
            elif code == R_SLOW_MMIO:
                self._finish_mmio(run)
            else:
                return code
            if ctl[V_STOP]:
                return VCPU_STOPPED
            if ctl[V_EXITS] == ctl[V_LIMIT]:
                return VCPU_LIMIT

    def _compile_python_paths(self):
        """Compile (or load from the cache) the kernels the bus calls from
        Python, before they are needed: a first compile at a slow exit
        would take seconds (timeouts, watchdogs).  Nothing is accessed."""
        regs, by, mx = self.regs[0, :1], self.bytes_[0, :B_CFG], self.msix[0]
        for fn, args in ((_conf1, (self.conf, self.space, CONFIG_DATA, 4, True, 0, False)),
                         (_port_access, (self.conf, self.space, self.ports, self.kstate, self.port_counts, 0, 4,
                                         True, 0)),
                         (_mmio_access, (self.page_slot, self.regs, self.bytes_, self.msix, self.notify_fd,
                                         self.mmio_counts, self.pend, 0, 4, True, 0)),
                         (_bar_access, (regs, by, mx, 0, 4, True, 0))):
            if hasattr(fn, "compile"):           # not under NUMBA_DISABLE_JIT
                fn.compile(tuple(numba.typeof(a) for a in args))

    def _finish_pio(self, run):
        size = int(run[RUN_IO_SIZE])
        port = int(run[RUN_IO_PORT:RUN_IO_PORT + 2].view(np.uint16)[0])
        count = int(run[RUN_IO_COUNT:RUN_IO_COUNT + 4].view(np.uint32)[0])
        data = int(run[RUN_IO_DATA_OFFSET:RUN_IO_DATA_OFFSET + 8].view(np.uint64)[0])
        is_write = int(run[RUN_IO_DIRECTION]) == KVM_EXIT_IO_OUT
        first = int(self.pend[PD_INDEX])
        for i in range(first, count):
            at = data + i * size
            v = get_le(run, at, size) if is_write else 0
            # The element the loop stopped at goes straight to Python (it
            # was counted); the rest through the whole dispatch.
            r = self._pio_python(port, size, is_write, v) if i == first else self.pio(port, size, is_write, v)
            if not is_write:
                put_le(run, at, size, r)

    def _finish_mmio(self, run):
        ln = int(run[RUN_MMIO_LEN:RUN_MMIO_LEN + 4].view(np.uint32)[0])
        addr = int(run[RUN_MMIO_PHYS:RUN_MMIO_PHYS + 8].view(np.uint64)[0])
        is_write = bool(run[RUN_MMIO_IS_WRITE])
        v = get_le(run, RUN_MMIO_DATA, ln) if is_write else 0
        if self.pend[PD_STATUS] == ST_BAR_SLOW:
            with self._lock:
                r = self._bar_slow(v)
        else:
            r = self._mmio_python(addr, ln, is_write, v)
        if not is_write:
            put_le(run, RUN_MMIO_DATA, ln, r)

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

    def access_counts(self) -> list:
        """[(register name, accesses)], non-zero only, most first: every port
        (by handler register) and BAR0 register (device, then region or
        common-config field) the guest or a backend accessed."""
        rows = [(self._port_name(int(p)), int(self.port_counts[p])) for p in np.flatnonzero(self.port_counts)]
        for slot, reg in zip(*np.nonzero(self.mmio_counts)):
            t = self.slots[slot] if slot < MAX_SLOTS else None
            name = f"{t.name} {M_NAMES[reg]}" if t is not None else "mmio (unclaimed)"
            rows.append((name, int(self.mmio_counts[slot, reg])))
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
                t.bar0 = get_le(self.cfg[t.slot], PCI_BASE_ADDRESS_0, 4) & ~(BAR0_SIZE - 1) & 0xFFFFFFFF
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
        if self._warming is not None:
            self._warming.join()           # a compile cut short by interpreter exit can crash it
        for t in self.devices:
            try:
                t.device.reset()
            finally:
                t.close()


__all__ = [
    "Bus", "Transport", "VirtioDevice", "QueueContext", "BadDriver", "IrqAllocator", "RULES",
    "BAR0_SIZE", "COMMON_OFF", "ISR_OFF", "DEVCFG_OFF", "NOTIFY_OFF", "NOTIFY_STRIDE",
    "conf1_address", "conf1_read", "conf1_write",
]


# ---------------------------------------------------------------------------
# Guest-side helpers: what Linux's pci_conf1_read/write do (tests, benchmarks)

def conf1_address(slot: int, offset: int, bus: int = 0, function: int = 0) -> int:
    return 0x80000000 | bus << 16 | slot << 11 | function << 8 | (offset & 0xFC)


def conf1_read(bus: Bus, slot: int, offset: int, size: int) -> int:
    """outl(address, 0xCF8); in{b,w,l}(0xCFC + (offset & 3))."""
    bus.pio(CONFIG_ADDRESS, 4, True, conf1_address(slot, offset))
    return bus.pio(CONFIG_DATA + (offset & 3), size, False, 0)


def conf1_write(bus: Bus, slot: int, offset: int, size: int, value: int) -> None:
    bus.pio(CONFIG_ADDRESS, 4, True, conf1_address(slot, offset))
    bus.pio(CONFIG_DATA + (offset & 3), size, True, value)
