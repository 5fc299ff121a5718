"""Split virtqueue engine (virtio 1.0 §2.4), as Numba kernels over guest RAM.

The device side of a split virtqueue: pop the next available descriptor
chain into an iovec, push used elements, publish them, and decide whether
the driver wants an interrupt or the device wants notifications.  The
semantics are lguest's ``wait_for_vq_desc`` / ``next_desc`` / ``add_used`` /
``trigger_irq``, with every guest-controlled value checked in the kernel
that uses it.

Queue state is one int64 array per queue (``new_queue()``), indexed by the
``Q_*`` constants.  Kernels never raise: a malformed ring comes back as a
negative error code (``-E_*``); ``error_message(code)`` names the rule and
the spec section it enforces.  What a device does about it is the
transport's policy (pci.py), not the engine's.

iovec arrays are ``(n, 3)`` uint64: guest address, length, writable flag,
device-readable entries first.  ``n`` must be at least the queue size: a
valid chain never holds more descriptors than that (§2.4.5.3.1).

Ring layout for a queue of size N (§2.4.5, §2.4.6, §2.4.8):
  desc  N x {addr u64, len u32, flags u16, next u16}        16-byte aligned
  avail {flags u16, idx u16, ring[N] u16, used_event u16}   2-byte aligned
  used  {flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16}
                                                            4-byte aligned
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .hw.memory import (fence, in_ram, ld_u16, ld_u16_acquire, ld_u32, ld_u64,
                        st_u16, st_u16_release, st_u32)

# Descriptor, ring and feature bits (§2.4.5, §2.4.7, §2.4.9, §6).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.4: "The maximum Queue Size value is 32768"

# ---------------------------------------------------------------------------
# Errors.  One code per rule; kernels return them negated.

OK = 0
NO_BUFFER = -1          # pop: the ring is empty (not an error)
E_AVAIL_IDX = 2
E_HEAD_RANGE = 3
E_NEXT_RANGE = 4
E_CHAIN_LOOP = 5
E_OUT_AFTER_IN = 6
E_BUF_RANGE = 7
E_INDIRECT_FEATURE = 8
E_INDIRECT_NESTED = 9
E_INDIRECT_NEXT = 10
E_INDIRECT_LEN = 11
E_INDIRECT_SIZE = 12
E_INDIRECT_RANGE = 13
E_QUEUE_SIZE = 14
E_DESC_ALIGN = 15
E_AVAIL_ALIGN = 16
E_USED_ALIGN = 17
E_DESC_RANGE = 18
E_AVAIL_RANGE = 19
E_USED_RANGE = 20
E_IOV_SHORT = 21

ERRORS = {
    E_AVAIL_IDX: "avail.idx moved further than the queue size since the device last looked (§2.4.6)",
    E_HEAD_RANGE: "available ring names a head descriptor >= queue size (§2.4.6)",
    E_NEXT_RANGE: "descriptor next field >= the size of its table (§2.4.5)",
    E_CHAIN_LOOP: "descriptor chain longer than its table: a loop (§2.4.5.2)",
    E_OUT_AFTER_IN: "device-readable descriptor after a device-writable one (§2.4.5.2)",
    E_BUF_RANGE: "descriptor buffer lies outside guest RAM (§2.4.5)",
    E_INDIRECT_FEATURE: "INDIRECT descriptor without VIRTIO_RING_F_INDIRECT_DESC negotiated (§2.4.5.3.1)",
    E_INDIRECT_NESTED: "INDIRECT descriptor inside an indirect table (§2.4.5.3.1)",
    E_INDIRECT_NEXT: "INDIRECT and NEXT set in the same descriptor (§2.4.5.3.1)",
    E_INDIRECT_LEN: "indirect table length is zero or not a multiple of 16 (§2.4.5.3)",
    E_INDIRECT_SIZE: "indirect table holds more descriptors than the queue size (§2.4.5.3.1)",
    E_INDIRECT_RANGE: "indirect table lies outside guest RAM (§2.4.5.3)",
    E_QUEUE_SIZE: "queue size is zero, not a power of two, or above the device maximum (§2.4, §4.1.4.3.2)",
    E_DESC_ALIGN: "descriptor table not 16-byte aligned (§2.4)",
    E_AVAIL_ALIGN: "available ring not 2-byte aligned (§2.4)",
    E_USED_ALIGN: "used ring not 4-byte aligned (§2.4)",
    E_DESC_RANGE: "descriptor table lies outside guest RAM (§2.4)",
    E_AVAIL_RANGE: "available ring lies outside guest RAM (§2.4)",
    E_USED_RANGE: "used ring lies outside guest RAM (§2.4)",
    E_IOV_SHORT: "iovec array shorter than the queue size (launcher bug)",
}


def error_message(code: int) -> str:
    """The rule a (positive or negated) error code stands for."""
    return ERRORS.get(abs(int(code)), f"unknown vring error {code}")


# ---------------------------------------------------------------------------
# Queue state: one int64 array per queue.

Q_SIZE = 0           # N, a power of two
Q_DESC = 1           # guest addresses of the three parts
Q_AVAIL = 2
Q_USED = 3
Q_FEATURES = 4       # negotiated ring features (INDIRECT_DESC, EVENT_IDX bits)
Q_LAST_AVAIL = 5     # next avail ring slot the device will read (free-running u16)
Q_USED_IDX = 6       # device's used index, published or not (free-running u16)
Q_SIGNALLED = 7      # used index at the last interrupt decision (event idx "old")
Q_PENDING = 8        # used elements pushed since the last interrupt decision
Q_OUT = 9            # out/in descriptor counts of the last popped chain
Q_IN = 10
Q_OUT_BYTES = 11     # total bytes of the last popped chain, readable / writable
Q_IN_BYTES = 12
Q_ERROR = 13         # first error seen (positive code), 0 if none
# counters, updated inside the kernels
Q_N_CHAINS = 14
Q_N_USED = 15
Q_N_IRQ = 16
Q_N_IRQ_SUPPRESSED = 17
Q_N_ERRORS = 18
Q_FIELDS = 19


def new_queue() -> np.ndarray:
    return np.zeros(Q_FIELDS, dtype=np.int64)


def _is_pow2(n):
    return n > 0 and (n & (n - 1)) == 0


@njit(nogil=True, cache=True)
def _check_queue_layout(mem_size, size, max_size, desc, avail, used):
    if size <= 0 or (size & (size - 1)) != 0 or size > max_size or size > MAX_QUEUE_SIZE:
        return E_QUEUE_SIZE
    if desc & 15:
        return E_DESC_ALIGN
    if avail & 1:
        return E_AVAIL_ALIGN
    if used & 3:
        return E_USED_ALIGN
    if not in_ram(desc, DESC_SIZE * size, mem_size):
        return E_DESC_RANGE
    if not in_ram(avail, 6 + 2 * size, mem_size):
        return E_AVAIL_RANGE
    if not in_ram(used, 6 + 8 * size, mem_size):
        return E_USED_RANGE
    return OK


def check_queue_layout(mem_size: int, size: int, max_size: int, desc: int, avail: int, used: int) -> int:
    """Validate a queue at enable time (§2.4 alignment and size, rings inside
    RAM).  Returns OK (0) or a positive error code for ``error_message``.
    Addresses are the 64-bit values the driver wrote."""
    for addr in (desc, avail, used):
        if not 0 <= addr < 2**64:
            raise ValueError(f"ring address {addr:#x} is not a 64-bit value")
    # Addresses >= 2**63 can never be in RAM; pass them as -1 so the kernel's
    # int64 arguments cannot overflow.
    def fit(a):
        return a if a < 2**63 else -1
    return int(_check_queue_layout(int(mem_size), int(size), int(max_size), fit(desc), fit(avail), fit(used)))


def setup_queue(q: np.ndarray, mem_size: int, size: int, max_size: int,
                desc: int, avail: int, used: int, features: int) -> int:
    """Validate and load a queue's layout into state array ``q``; reset its
    indices.  Returns OK or a positive error code (state untouched then)."""
    err = check_queue_layout(mem_size, size, max_size, desc, avail, used)
    if err:
        return err
    q[:] = 0
    q[Q_SIZE] = size
    q[Q_DESC] = desc
    q[Q_AVAIL] = avail
    q[Q_USED] = used
    q[Q_FEATURES] = features & ((1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX))
    return OK
