"""The virtio 1.0 PCI modern transport (§4.1): BAR0 layout, its kernels,
the driver rules (``RULES``, ``E_*``, :class:`BadDriver`) and :class:`Transport`.

Driver errors
=============
Every driver-conformance rule lguest enforces has an ``E_*`` code; the
``RULES`` table gives its text, virtio 1.0 section and what the device does
about it.  ``strict``: raise :class:`BadDriver` (``str()`` is
``"<device>: <rule> (§x.y)"``; the vCPU loop prints ``bad driver: ...`` and
stops).  Default: behave like a device — drop the bad access (or, for the
rules marked ``NEEDS_RESET``, set DEVICE_NEEDS_RESET and raise a config
interrupt), log the rule once per device, keep running.

BAR0 (``BAR0_SIZE`` bytes)::

    0x000  common configuration (0x38 bytes)        §4.1.4.3
    0x040  ISR status (1 byte, read-to-clear)        §4.1.4.5
    0x100  device-specific configuration            §4.1.4.6
    0x800  notify: per-queue 2-byte registers 4 apart, or one register
                                                    §4.1.4.4
    0x1000 MSI-X table (16 bytes per vector)        PCI 3.0 §6.8.2
    0x1800 MSI-X pending bit array (read-only)

``bar0_access`` does all of BAR0 from tables (field at each common-config
offset, its width) and two arrays per device: ``regs`` (row 0 device state,
row 1+q queue q's registers: queue_select just picks the row, which is the
per-queue save/restore) and ``bytes`` (ISR, then a copy of the device
config, refreshed by ``config_changed()``).  It returns an action code for
the few slow paths Python handles (reset, status log, DRIVER_OK,
queue_enable -> ``vring.setup_queue``, notify -> eventfd write, device
config writes) and an error code for the policy.

MSI-X table and pending-bit rules: ``lguest_jit.irq``.
"""
from __future__ import annotations

import os
import select
import threading

import numpy as np
from numba import njit

from .. import irq, vring
from ..hw.fields import Blob, Bool, Int, List, Record, Str, U, blob, check
from ..irq import (ISR_CONFIG, MSIX_CTRL_MASKBIT, MV_ADDR_HI, MV_ADDR_LO, MV_CTRL, MV_DATA, MV_FD, MV_PENDING,
                   MX_ENABLED, MX_INTX_FD, MX_MASKED, MX_VECTORS, VIRTIO_MSI_NO_VECTOR)
from .config import (MAX_SLOTS, MSIX_ENTRY_SIZE, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE,
                     PCI_MSIX_FLAGS_MASKALL, ConfigBuilder, read_le, size_mask, write_le)
from .device import QueueContext, VirtioDevice


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

# Slow-path actions returned by bar0_access
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
    E_QUEUE_SIZE_VALUE: ("queue_size zero, above the maximum, or (split rings) not a power of two",
                         "4.1.4.3.2, 2.4, 2.7", IGNORE),
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

    value &= size_mask(size)
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
        # Split rings need a power of two (§2.4); packed ones any size (§2.7).
        packed = (regs[0, S_DRIVER_HI] >> (vring.VIRTIO_F_RING_PACKED - 32)) & 1
        if value == 0 or (packed == 0 and (value & (value - 1)) != 0) or value > regs[1 + q, QC_MAX]:
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
def bar0_access(regs, bytes_, msix, off, size, is_write, value):
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
        cb = ConfigBuilder(b.cfg[s], b.wmask[s], b.hook[s], b.region[s])
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
            cb.msix_cap(off, self.msix_vectors, MSIX_TABLE_OFF, MSIX_PBA_OFF)

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
        irq.raise_msix(self.isr, self.msix, np.zeros(1, np.uint64), vector, bit)

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
        ctl = read_le(self.bus.cfg[self.slot], self.msix_cap + PCI_MSIX_FLAGS, 2)
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
                        irq.msix_send_pending(m, v, self._scratch)
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
            irq.msix_send_pending(m, v, self._scratch)

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
        r, action, arg, err = bar0_access(self.regs, self.bytes, self.msix, off, size, is_write, value & 0xFFFFFFFF)
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
        offset = read_le(cfg, w + 8, 4)
        length = read_le(cfg, w + 12, 4)
        ok = (bar == 0 and length in (1, 2, 4) and offset % length == 0 and offset + length <= BAR0_SIZE)
        return ok, bar, offset, length

    def window_read(self):
        ok, bar, offset, length = self._window()
        if not ok:
            self.driver_error(E_CFG_WINDOW, f"bar {bar} offset {offset:#x} length {length}")
            return
        v = self.bar_access(offset, length, False, 0)
        write_le(self.bus.cfg[self.slot], self.cfg_window + 16, 4, v)
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: window read {v:#x} from bar {bar} offset {offset:#x} len {length}")

    def window_write(self):
        ok, bar, offset, length = self._window()
        if not ok:
            self.driver_error(E_CFG_WINDOW, f"bar {bar} offset {offset:#x} length {length}")
            return
        v = read_le(self.bus.cfg[self.slot], self.cfg_window + 16, length)
        if self.bus.log is not None:
            self.bus.log(f"{self.name}: window write {v:#x} to bar {bar} offset {offset:#x} len {length}")
        self.bar_access(offset, length, True, v)

    def command_written(self):
        cmd = read_le(self.bus.cfg[self.slot], PCI_COMMAND, 2)
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
            # The layout follows the negotiated features, as at queue enable.
            if vring.layout_name(q) != ("packed" if self.features >> vring.VIRTIO_F_RING_PACKED & 1 else "split"):
                q[:] = 0
                raise ValueError(f"{self.name}: snapshot queue {i}: its ring layout is not the negotiated one")
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
