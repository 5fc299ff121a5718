"""Interrupt delivery: INTx (ISR bit + the device's line) and MSI-X, as
kernels the queue threads (``vring``) and the transport (``pci``) call.

MSI-X (PCI 3.0 §6.8, virtio 1.0 §4.1.5)
=======================================
With ``msix=True`` each device has an MSI-X capability (id 0x11, last in
the list) with one vector per queue plus one for configuration changes
(at most ``MSIX_MAX_VECTORS``): Message Control holds the table size - 1
(read-only) and the writable Enable (bit 15) and Function Mask (bit 14),
whose writes reach ``Transport.msix_control_written`` (hook H_MSIX); Table
and PBA are at ``MSIX_TABLE_OFF``/``MSIX_PBA_OFF`` in BAR0 (BIR 0), so
they move with it.  The state is ``bus.msix[slot]`` (= ``transport.msix``):
row 0 the function, row 1 + v entry v (the MX_*/MV_* fields below).

* Table entries (address lo/hi, data, vector control) take aligned DWORD
  or QWORD accesses; anything else, entries past the table, PBA writes and
  reads past it break E_MSIX_ACCESS (dropped, reads 0).  Reset: every
  entry masked.  Address bits 1:0 and control bits 31:1 read 0.
* msix_config / queue_msix_vector store the vector; one the table lacks
  stores NO_VECTOR (E_MSIX; the driver reads it back and falls back).
  Device reset maps every event to NO_VECTOR; the table is PCI state and
  stays.
* Delivery (``raise_msix``, from the queue threads and for config
  changes): MSI-X disabled -> ISR bit + INTx, as without the capability.
  Enabled -> no ISR bit, no INTx: the event's vector, or nothing for
  NO_VECTOR.  A masked vector or function sets the pending bit instead;
  clearing the mask sends it (§6.8.3.4).  Set and cleared by atomic
  exchange, so a raise racing an unmask sends exactly once.
* Routes first: clearing a mask bit (action A_MSIX_UNMASK), enabling or
  unmasking the function, or rewriting an unmasked entry (A_MSIX_ROUTE)
  calls the MSI listeners before the vector can send on the new message.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .hw.libc import sys_write
from .hw.memory import fence, ld_i64_acquire, xchg_i64

# Raising an interrupt: INTx (ISR bit + the device's line) or MSI-X.
#
# A device's MSI-X state is one int64 array (``pci.Bus.msix[slot]``):
# row 0 the function (MX_*), row 1 + v vector v (MV_*).  The transport keeps
# the table there; queue threads read it here.  Delivery follows PCI 3.0
# §6.8.3.4 and virtio 1.0 §4.1.5.3-4: with MSI-X enabled an event goes to
# its vector (no ISR bit, no INTx); a masked vector (or function) keeps the
# message as its pending bit, sent when it is unmasked.  The pending bit is
# exchanged atomically on both sides: the raiser sets it, then sends only
# if it can exchange it back to 0 while unmasked; the unmasking vCPU clears
# the mask, then sends if it exchanges a 1 out.  Whatever the interleaving,
# exactly one of them sends.

ISR_QUEUE = 1        # ISR bits (§4.1.4.5): a used buffer, a configuration change
ISR_CONFIG = 2
VIRTIO_MSI_NO_VECTOR = 0xFFFF

MX_VECTORS = 0       # table size; 0: the device offers no MSI-X capability
MX_ENABLED = 1       # Message Control Enable
MX_MASKED = 2        # Message Control Function Mask
MX_INTX_FD = 3       # the device's INTx eventfd
MV_ADDR_LO = 0       # table entry: message address and data
MV_ADDR_HI = 1
MV_DATA = 2
MV_CTRL = 3          # vector control; bit 0 masks the vector
MV_PENDING = 4       # the PBA bit
MV_FD = 5            # the vector's eventfd (KVM: an irqfd on the vector's MSI route)
MSIX_CTRL_MASKBIT = 1

IRQ_SENT = 0         # raise_irq results
IRQ_MASKED = 1
IRQ_NO_VECTOR = 2


@njit(nogil=True, cache=True)
def _kick_fd(fd, scratch):
    scratch[0] = 1
    sys_write(fd, scratch.ctypes.data, 8)


@njit(nogil=True, cache=True)
def raise_intx(isr, irq_fd, scratch, bit):
    """Set ISR ``bit`` first (§4.1.4.5.1), then raise the line by writing
    the device's INTx eventfd."""
    isr[0] |= bit
    fence()
    _kick_fd(irq_fd, scratch)
    return IRQ_SENT


@njit(nogil=True, cache=True)
def msix_send_pending(msix, vector, scratch):
    """The vCPU side of delivery: after ``vector``'s mask (or the function
    mask) was cleared, send its message if its pending bit was set.
    Returns True when sent."""
    row = msix[1 + vector]
    if xchg_i64(row, MV_PENDING, 0) != 0:
        _kick_fd(row[MV_FD], scratch)
        return True
    return False


@njit(nogil=True, cache=True)
def raise_msix(isr, msix, scratch, vector, bit):
    """An event of a device with MSI-X state ``msix``: INTx while MSI-X is
    disabled, else a message on ``vector`` (pending while masked; dropped
    when the event has no vector).  Returns IRQ_SENT, IRQ_MASKED or
    IRQ_NO_VECTOR."""
    if msix[0, MX_ENABLED] == 0:
        return raise_intx(isr, msix[0, MX_INTX_FD], scratch, bit)
    if vector < 0 or vector >= msix[0, MX_VECTORS]:
        return IRQ_NO_VECTOR
    row = msix[1 + vector]
    xchg_i64(row, MV_PENDING, 1)
    if msix[0, MX_MASKED] != 0 or (ld_i64_acquire(row, MV_CTRL) & MSIX_CTRL_MASKBIT) != 0:
        return IRQ_MASKED
    if xchg_i64(row, MV_PENDING, 0) != 0:
        _kick_fd(row[MV_FD], scratch)
    return IRQ_SENT


def raise_irq(isr, irq, scratch, vector, bit):
    """Raise a device interrupt for ``vector`` (the event's MSI-X vector) /
    ISR ``bit``.  ``irq`` is either the device's INTx eventfd (a device
    without MSI-X, or a test rig) or its MSI-X state array (the transport's
    queue threads): each gets its own compiled body."""
    if isinstance(irq, np.ndarray):
        return raise_msix(isr, irq, scratch, vector, bit)
    return raise_intx(isr, irq, scratch, bit)


@overload(raise_irq, inline="always")
def _raise_irq_ol(isr, irq, scratch, vector, bit):
    if isinstance(irq, types.Array):
        return lambda isr, irq, scratch, vector, bit: raise_msix(isr, irq, scratch, vector, bit)
    return lambda isr, irq, scratch, vector, bit: raise_intx(isr, irq, scratch, bit)
