"""Virtqueue engine, split (virtio 1.0 §2.4) and packed (virtio 1.1 §2.7)
rings, as Numba kernels over guest RAM.

The device side of a split virtqueue: pop the next available descriptor
chain into an iovec, push used elements, publish them, and decide whether
the driver wants an interrupt or the device wants notifications.  The
semantics are lguest's ``wait_for_vq_desc`` / ``next_desc`` / ``add_used`` /
``trigger_irq``, with every guest-controlled value checked in the kernel
that uses it.

This module is the one home of the device side of the protocol.  Devices
call its public kernels from their own service kernels: ``next_chain``
(wait for a chain and check the shape the device needs), ``complete``,
``notify_used``, ``finish``, ``unpop``, and the iovec helpers
``iov_to_buf``/``buf_to_iov``/``iov_consume``/``iov_advance``; they keep
only their own I/O.

Queue state is one int64 array per queue (``new_queue()``), indexed by the
``Q_*`` constants.  Kernels never raise: a malformed ring, or a chain of
the wrong shape for its device, comes back as a negated error code
(``-E_*``, one per rule, in the one ``ERRORS`` table); ``error_message(code)``
names the rule and the spec section it enforces.  What a device does about
it is the transport's policy (``pci.transport``), not the engine's.

iovec arrays are ``(n, 3)`` uint64: guest address, length, writable flag,
device-readable entries first.  ``n`` must be at least the queue size: a
valid chain never holds more descriptors than that (§2.4.5.3.1).

Ring layout for a queue of size N (§2.4.5, §2.4.6, §2.4.8):
  desc  N x {addr u64, len u32, flags u16, next u16}        16-byte aligned
  avail {flags u16, idx u16, ring[N] u16, used_event u16}   2-byte aligned
  used  {flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16}
                                                            4-byte aligned

Packed rings (virtio 1.1 §2.7, negotiated with VIRTIO_F_RING_PACKED) are
served by the same public kernels: the layout is a field of the queue state
(``Q_LAYOUT``, set by ``setup_queue`` from the negotiated features) and each
kernel branches on it once, so devices never know which layout they serve.
For a packed queue ``Q_DESC`` is the descriptor ring, ``Q_AVAIL`` the driver
event suppression structure and ``Q_USED`` the device's (§2.7.10.1):
  ring   N x {addr u64, len u32, id u16, flags u16}         16-byte aligned
  driver {off_wrap u16, flags u16}  (read by the device)     4-byte aligned
  device {off_wrap u16, flags u16}  (written by the device)  4-byte aligned
N need not be a power of two (up to 2**15).  ``Q_LAST_AVAIL`` and
``Q_USED_IDX`` are then ring positions (0..N-1) with their wrap counters
beside them, and a popped chain's "head" is its buffer ID plus the number
of ring slots it took, ``id | slots << 16`` (what ``complete`` needs to
write the one used descriptor and skip the rest, §2.7.6).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .hw.libc import CLOCK_MONOTONIC, EAGAIN, EINTR, sys_clock_gettime, sys_read
from .hw.memory import (cpu_relax, fence, in_ram, ld_u16, ld_u16_acquire, ld_u32, ld_u64, st_u16,
                        st_u16_release, st_u32)
from .irq import IRQ_MASKED, IRQ_NO_VECTOR, IRQ_SENT, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR, raise_irq

# Descriptor, ring and feature bits (§2.4.5, §2.4.7, §2.4.9, §6).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
# Packed ring (§2.7.1, §2.7.14): availability bits, event suppression.
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
RING_EVENT_WRAP_SHIFT = 15
MAX_PACKED_QUEUE_SIZE = 1 << 15   # §2.7: "up to 2^15 entries"
LAYOUT_SPLIT = 0
LAYOUT_PACKED = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.4: "The maximum Queue Size value is 32768"

# ---------------------------------------------------------------------------
# Errors.  One code per rule; kernels return them negated.

OK = 0
NO_BUFFER = -1          # pop: the ring is empty (not an error)
# STOPPED = -2 is defined with the queue state below; error codes start at 10
# so a negated code never collides with either.
E_AVAIL_IDX = 10
E_HEAD_RANGE = 11
E_NEXT_RANGE = 12
E_CHAIN_LOOP = 13
E_OUT_AFTER_IN = 14
E_BUF_RANGE = 15
E_INDIRECT_FEATURE = 16
E_INDIRECT_NESTED = 17
E_INDIRECT_NEXT = 18
E_INDIRECT_LEN = 19
E_INDIRECT_SIZE = 20
E_INDIRECT_RANGE = 21
E_QUEUE_SIZE = 22
E_DESC_ALIGN = 23
E_AVAIL_ALIGN = 24
E_USED_ALIGN = 25
E_DESC_RANGE = 26
E_AVAIL_RANGE = 27
E_USED_RANGE = 28
E_IOV_SHORT = 29
E_CHAIN_LONG = 30
E_NOTIFY_READ = 31
# Chain shapes a device requires (next_chain's ``shape``): one code per rule,
# whichever device enforces it.
E_CHAIN_READABLE = 32
E_CHAIN_WRITABLE = 33
E_NO_STATUS = 34
E_SHORT_HEADER = 35
# Launcher input rather than a driver rule: a snapshot's queue state.
E_SNAPSHOT_STATE = 36
# Packed rings (§2.7).  Rules shared with split rings keep their code (the
# message cites both sections).
E_PACKED_NOT_AVAIL = 37
E_PACKED_INDIRECT_CHAIN = 38
E_PACKED_ID_REUSE = 39
E_PACKED_EVENT_FLAGS = 40
E_PACKED_EVENT_DESC = 41
E_PACKED_QUEUE_SIZE = 42
E_EVENT_ALIGN = 43
E_DRIVER_EVENT_RANGE = 44
E_DEVICE_EVENT_RANGE = 45

ERRORS = {
    E_AVAIL_IDX: "avail.idx moved further than the queue size since the device last looked (§2.4.6)",
    E_HEAD_RANGE: "available ring names a head descriptor >= queue size (§2.4.6)",
    E_NEXT_RANGE: "descriptor next field >= the size of its table (§2.4.5)",
    E_CHAIN_LOOP: "descriptor chain longer than its table: a loop (§2.4.5.2)",
    E_OUT_AFTER_IN: "device-readable descriptor after a device-writable one (§2.4.5.2, §2.7.17)",
    E_BUF_RANGE: "descriptor buffer lies outside guest RAM (§2.4.5, §2.7.4)",
    E_INDIRECT_FEATURE: "INDIRECT descriptor without VIRTIO_RING_F_INDIRECT_DESC negotiated (§2.4.5.3.1, §2.7.19)",
    E_INDIRECT_NESTED: "INDIRECT descriptor inside an indirect table (§2.4.5.3.1, §2.7.19)",
    E_INDIRECT_NEXT: "INDIRECT and NEXT set in the same descriptor (§2.4.5.3.1)",
    E_INDIRECT_LEN: "indirect table length is zero or not a multiple of 16 (§2.4.5.3, §2.7.7)",
    E_INDIRECT_SIZE: "indirect table holds more descriptors than the queue size (§2.4.5.3.1, §2.7.19)",
    E_INDIRECT_RANGE: "indirect table lies outside guest RAM (§2.4.5.3, §2.7.7)",
    E_QUEUE_SIZE: "queue size is zero, not a power of two, or above the device maximum (§2.4, §4.1.4.3.2)",
    E_DESC_ALIGN: "descriptor table (or packed descriptor ring) not 16-byte aligned (§2.4, §2.7.10.1)",
    E_AVAIL_ALIGN: "available ring not 2-byte aligned (§2.4)",
    E_USED_ALIGN: "used ring not 4-byte aligned (§2.4)",
    E_DESC_RANGE: "descriptor table (or packed descriptor ring) lies outside guest RAM (§2.4, §2.7.10.1)",
    E_AVAIL_RANGE: "available ring lies outside guest RAM (§2.4)",
    E_USED_RANGE: "used ring lies outside guest RAM (§2.4)",
    E_IOV_SHORT: "iovec array shorter than the queue size (launcher bug)",
    E_CHAIN_LONG: "descriptor chain (direct plus indirect) longer than the queue size (§2.4.5.3.1, §2.7.17)",
    E_NOTIFY_READ: "reading the queue's notification eventfd failed (launcher bug)",
    E_CHAIN_READABLE: "device-readable buffer in a queue whose buffers the device only writes "
                      "(receive queues §5.1.6.3, §5.3.6.1; entropy requests §5.4.6; §2.4.5)",
    E_CHAIN_WRITABLE: "device-writable buffer in a transmit queue (§5.1.6, §5.3.6; §2.4.5)",
    E_NO_STATUS: "request whose last buffer is not a device-writable status byte (§5.2.6)",
    E_SHORT_HEADER: "request header shorter than the device's header structure (§5.2.6, §5.1.6)",
    E_SNAPSHOT_STATE: "snapshot queue state of the wrong shape, or with negative counters or indices",
    E_PACKED_NOT_AVAIL: "packed ring: a descriptor after the first of a list is not marked available for its lap "
                        "(VIRTQ_DESC_F_AVAIL must equal the driver's wrap counter there, VIRTQ_DESC_F_USED its "
                        "inverse; §2.7.1, §2.7.6, §2.7.21.1)",
    E_PACKED_INDIRECT_CHAIN: "packed ring: INDIRECT descriptor in a list linked by NEXT (§2.7.19)",
    E_PACKED_ID_REUSE: "packed ring: buffer ID made available again while the device still holds that buffer "
                       "(§2.7.21.1: the next free buffer id)",
    E_PACKED_EVENT_FLAGS: "packed ring: driver event suppression flags hold the reserved value 3 (§2.7.10, §2.7.14)",
    E_PACKED_EVENT_DESC: "packed ring: driver asks for a descriptor event (RING_EVENT_FLAGS_DESC) without "
                         "VIRTIO_F_RING_EVENT_IDX negotiated (§2.7.10)",
    E_PACKED_QUEUE_SIZE: "packed ring: queue size zero, above the device maximum or above 2^15 (§2.7, §4.1.4.3.2)",
    E_EVENT_ALIGN: "packed ring: an event suppression structure not 4-byte aligned (§2.7.10.1, §2.7.11)",
    E_DRIVER_EVENT_RANGE: "packed ring: driver event suppression structure lies outside guest RAM (§2.7.10.1)",
    E_DEVICE_EVENT_RANGE: "packed ring: device event suppression structure lies outside guest RAM (§2.7.10.1)",
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
Q_STOP = 14          # set by the launcher: a waiting service kernel returns STOPPED
# counters, updated inside the kernels
Q_N_CHAINS = 15      # chains popped
Q_N_USED = 16        # used elements pushed
Q_N_NOTIFY = 17      # wake-ups from the notification eventfd
Q_N_IRQ = 18         # interrupts raised
Q_N_IRQ_SUPPRESSED = 19  # interrupt decisions that found the driver did not want one
Q_N_ERRORS = 20
Q_N_BYTES = 21       # payload bytes moved by the device (its kernels add them)
Q_POLL_SPINS = 22    # busy-poll this many times for new buffers before sleeping (0: never)
Q_N_POLL_HITS = 23   # buffers found by busy-polling, i.e. notifications avoided
Q_N_IRQ_MASKED = 24  # interrupts left pending: their MSI-X vector (or the function) was masked
Q_N_IRQ_NO_VECTOR = 25   # interrupts dropped: MSI-X on and the queue mapped to no vector (§4.1.5.3)
Q_VECTOR = 26        # the queue's MSI-X vector (queue_msix_vector), VIRTIO_MSI_NO_VECTOR for none
# Request latency: from the moment the device first sees a chain (woken by
# the driver's notification, or finding it while polling) to its used
# element, a log2 histogram in nanoseconds kept by _pop and _push.  A clock
# read costs 30-90 ns on our hosts, as much as a whole pop+push, so one chain
# in Q_LAT_EVERY is timed (a sample; Q_N_USED has the exact count), and a
# chain popped with no wait since a timed push starts at that push.
Q_LAT_SEEN = 27      # avail.idx when the device last read the clock in _pop
Q_LAT_SEEN_NS = 28   # ... and that time: every entry before Q_LAT_SEEN was visible by then
Q_LAT_CHAIN_NS = 29  # when the chain popped last was first seen (0: not timed)
Q_LAT_NOW_NS = 30    # time of the last push, while the thread has not waited since (else 0)
Q_TIMESPEC = 31      # two fields: clock_gettime's struct timespec, private to the queue's thread
Q_LAT_EVERY = 33     # time one chain in this many (a power of two; 0: none)
Q_LAT_HIST = 34      # LAT_BUCKETS counters: bucket k holds latencies of k bits (2**(k-1) .. 2**k - 1 ns)
LAT_BUCKETS = 64
LAT_EVERY = 16       # the default sampling period
# Packed rings (§2.7).  Q_LAST_AVAIL / Q_USED_IDX are ring positions then.
Q_LAYOUT = Q_LAT_HIST + LAT_BUCKETS   # LAYOUT_SPLIT or LAYOUT_PACKED, fixed at setup_queue
Q_AVAIL_WRAP = Q_LAYOUT + 1   # the device's view of the driver's wrap counter at Q_LAST_AVAIL (§2.7.1)
Q_USED_WRAP = Q_LAYOUT + 2    # the Device Ring Wrap Counter at Q_USED_IDX (§2.7.1)
Q_LAST_SLOTS = Q_LAYOUT + 3   # ring slots and buffer ID of the chain popped last (for unpop)
Q_LAST_ID = Q_LAYOUT + 4
Q_PENDING_SLOTS = Q_LAYOUT + 5   # ring slots used since the last interrupt decision
Q_EVENT_ERROR = Q_LAYOUT + 6  # a driver event suppression rule broken while deciding an interrupt,
                              # returned by the next pop (decisions return no code)
Q_IDS = Q_LAYOUT + 7          # IDS_WORDS words, 32 bits each: buffer IDs the device holds (popped, not used)
IDS_WORDS = 65536 // 32
Q_FIELDS = Q_IDS + IDS_WORDS

STOPPED = -2         # wait_chain: the launcher asked the queue to stop


def new_queue() -> np.ndarray:
    return np.zeros(Q_FIELDS, dtype=np.int64)


@njit(nogil=True, cache=True)
def _check_queue_layout(mem_size, size, max_size, desc, avail, used, packed):
    if packed:
        # §2.7: any size up to 2^15; the event structures are 4 bytes each.
        if size <= 0 or size > max_size or size > MAX_PACKED_QUEUE_SIZE:
            return E_PACKED_QUEUE_SIZE
        if desc & 15:
            return E_DESC_ALIGN
        if (avail & 3) or (used & 3):
            return E_EVENT_ALIGN
        if not in_ram(desc, DESC_SIZE * size, mem_size):
            return E_DESC_RANGE
        if not in_ram(avail, 4, mem_size):
            return E_DRIVER_EVENT_RANGE
        if not in_ram(used, 4, mem_size):
            return E_DEVICE_EVENT_RANGE
        return OK
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


def check_queue_layout(mem_size: int, size: int, max_size: int, desc: int, avail: int, used: int,
                       packed: bool = False) -> int:
    """Validate a queue at enable time (§2.4 alignment and size, rings inside
    RAM; for a packed ring §2.7.10.1: ``avail``/``used`` are then the driver
    and device event suppression structures).  Returns OK (0) or a positive
    error code for ``error_message``.  Addresses are the 64-bit values the
    driver wrote."""
    for addr in (desc, avail, used):
        if not 0 <= addr < 2**64:
            raise ValueError(f"ring address {addr:#x} is not a 64-bit value")
    # Pass the raw 64 bits as int64 (two's complement), as kernels see
    # guest values: low bits keep their alignment, and anything >= 2**63
    # turns negative, which in_ram rejects.
    def bits(a):
        return a - 2**64 if a >= 2**63 else a
    return int(_check_queue_layout(int(mem_size), int(size), int(max_size), bits(desc), bits(avail), bits(used),
                                   bool(packed)))


def setup_queue(q: np.ndarray, mem_size: int, size: int, max_size: int,
                desc: int, avail: int, used: int, features: int) -> int:
    """Validate and load a queue's layout into state array ``q``; reset its
    indices.  The ring layout follows the negotiated ``features``: packed
    when VIRTIO_F_RING_PACKED is among them.  Returns OK or a positive error
    code (state untouched then)."""
    packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
    err = check_queue_layout(mem_size, size, max_size, desc, avail, used, packed)
    if err:
        return err
    q[:] = 0
    q[Q_SIZE] = size
    q[Q_DESC] = desc
    q[Q_AVAIL] = avail
    q[Q_USED] = used
    q[Q_FEATURES] = features & ((1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX))
    q[Q_VECTOR] = VIRTIO_MSI_NO_VECTOR
    q[Q_LAT_EVERY] = LAT_EVERY
    if packed:
        # §2.7.1: both wrap counters start at 1.
        q[Q_LAYOUT] = LAYOUT_PACKED
        q[Q_AVAIL_WRAP] = 1
        q[Q_USED_WRAP] = 1
    return OK


def layout_name(q) -> str:
    """"split" or "packed": the ring layout of a set-up queue (--stats)."""
    return "packed" if q[Q_LAYOUT] == LAYOUT_PACKED else "split"


# What a snapshot holds of a queue, by name: the ring's layout (validated
# again on restore), its free-running indices and its counters.  Everything
# else is this process's (the poll budget, vector and clock fields are set
# afresh; per-chain fields stay cleared: a paused queue has no chain in hand).
QUEUE_LAYOUT = {"size": Q_SIZE, "desc": Q_DESC, "avail": Q_AVAIL, "used": Q_USED, "features": Q_FEATURES,
                "layout": Q_LAYOUT}
QUEUE_INDICES = {"last_avail": Q_LAST_AVAIL, "used_idx": Q_USED_IDX, "signalled": Q_SIGNALLED}
QUEUE_COUNTERS = {"pending": Q_PENDING, "error": Q_ERROR, "chains": Q_N_CHAINS, "used_elements": Q_N_USED,
                  "notifications": Q_N_NOTIFY, "interrupts": Q_N_IRQ, "interrupts_suppressed": Q_N_IRQ_SUPPRESSED,
                  "errors": Q_N_ERRORS, "bytes": Q_N_BYTES, "poll_hits": Q_N_POLL_HITS,
                  "interrupts_masked": Q_N_IRQ_MASKED, "interrupts_no_vector": Q_N_IRQ_NO_VECTOR}
# A packed ring's position is more than its indices (§2.7.1): the wrap
# counters, the slots used since the last interrupt decision and the buffer
# IDs the device holds (saved as the list of held IDs, not the bitmap).
QUEUE_PACKED = {"avail_wrap": Q_AVAIL_WRAP, "used_wrap": Q_USED_WRAP, "pending_slots": Q_PENDING_SLOTS}


assert len({**QUEUE_LAYOUT, **QUEUE_INDICES, **QUEUE_COUNTERS, **QUEUE_PACKED}) == \
    len(QUEUE_LAYOUT) + len(QUEUE_INDICES) + len(QUEUE_COUNTERS) + len(QUEUE_PACKED), "one name per saved field"


def queue_state_schema():
    """The fields of ``queue_state()`` (``hw.fields``), with their bounds."""
    from .hw.fields import Int, List, Record, U
    # A packed ring's size need not be a power of two (§2.7): restore_queue
    # checks it as setup_queue does at enable time.
    f = {"size": Int(1, MAX_QUEUE_SIZE), "desc": U(63), "avail": U(63), "used": U(63),
         "features": U(63), "layout": Int(LAYOUT_SPLIT, LAYOUT_PACKED)}
    f.update({name: U(16) for name in QUEUE_INDICES})
    f.update({name: U(62) for name in QUEUE_COUNTERS})
    f["pending"] = U(16)
    f["latency_histogram"] = List(U(62), LAT_BUCKETS, min_len=LAT_BUCKETS)
    f.update({"avail_wrap": Int(0, 1), "used_wrap": Int(0, 1), "pending_slots": U(16)})
    f["held_ids"] = List(U(16), MAX_QUEUE_SIZE)
    return Record(f)


def queue_state(q: np.ndarray) -> dict:
    """A paused queue's state for a snapshot (``queue_state_schema``)."""
    out = {name: int(q[i]) for table in (QUEUE_LAYOUT, QUEUE_INDICES, QUEUE_COUNTERS) for name, i in table.items()}
    out["latency_histogram"] = [int(v) for v in q[Q_LAT_HIST:Q_LAT_HIST + LAT_BUCKETS]]
    out.update({name: int(q[i]) for name, i in QUEUE_PACKED.items()})
    out["held_ids"] = [w * 32 + b for w in np.flatnonzero(q[Q_IDS:Q_IDS + IDS_WORDS]).tolist()
                       for b in range(32) if int(q[Q_IDS + w]) >> b & 1]
    return out


def restore_queue(q: np.ndarray, saved: dict, mem_size: int, max_size: int) -> int:
    """Load a queue's state from a snapshot (untrusted input): the fields
    are read through ``queue_state_schema`` (a FieldError names the one
    that does not fit), the layout is validated as at enable time, the
    indices masked to their 16 bits.  Returns OK or a positive error code
    (``q`` untouched then)."""
    from .hw.fields import check
    saved = check(queue_state_schema(), saved, "queue")
    size, packed = saved["size"], saved["layout"] == LAYOUT_PACKED
    if packed and (not saved["last_avail"] < size or not saved["used_idx"] < size):
        return E_SNAPSHOT_STATE           # a packed ring's positions are slots inside the ring
    if not packed and (saved["held_ids"] or saved["pending_slots"]):
        return E_SNAPSHOT_STATE           # packed-only state in a split queue (its wrap fields are unused)
    feats = saved["features"] | (1 << VIRTIO_F_RING_PACKED if packed else 0)
    err = setup_queue(q, mem_size, size, max_size, saved["desc"], saved["avail"], saved["used"], feats)
    if err:
        return err
    for name, i in QUEUE_INDICES.items():
        q[i] = saved[name] & 0xFFFF
    if packed:
        for name, i in QUEUE_PACKED.items():
            q[i] = saved[name]
        for bid in saved["held_ids"]:
            q[Q_IDS + (bid >> 5)] |= np.int64(1) << (bid & 31)
    for name, i in QUEUE_COUNTERS.items():
        q[i] = saved[name]
    q[Q_LAT_HIST:Q_LAT_HIST + LAT_BUCKETS] = saved["latency_histogram"]
    return OK


def set_poll(q: np.ndarray, spins: int) -> None:
    """Busy-poll ``spins`` times (about 10-40 ns each) for new buffers
    before a queue's thread sleeps.  0 turns it off."""
    if not 0 <= spins < 2**31:
        raise ValueError("spins must be between 0 and 2**31")
    q[Q_POLL_SPINS] = spins


def set_latency_sampling(q: np.ndarray, every: int) -> None:
    """Time one chain in ``every`` (a power of two) for the latency
    histogram; 0 times none, 1 every chain."""
    if every < 0 or every & (every - 1) or every > 1 << 30:
        raise ValueError("every must be 0 or a power of two up to 2**30")
    q[Q_LAT_EVERY] = every


# ---------------------------------------------------------------------------
# Kernels.  ``mem`` is guest RAM, ``q`` a queue state array, ``iov`` an
# (n, 3) uint64 array.  Ring addresses in ``q`` were validated by
# setup_queue; everything read from the rings is validated here.

_F_INDIRECT = 1 << VIRTIO_RING_F_INDIRECT_DESC
_F_EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX


@njit(nogil=True, cache=True)
def _fail(q, code):
    if q[Q_ERROR] == 0:
        q[Q_ERROR] = code
    q[Q_N_ERRORS] += 1
    return -code


@njit(nogil=True, cache=True, inline='always')
def _now_ns(q):
    """CLOCK_MONOTONIC in nanoseconds, through the queue's own timespec
    fields (no allocation, no GIL; the vDSO, so no system call)."""
    sys_clock_gettime(CLOCK_MONOTONIC, q.ctypes.data + np.uintp(8 * Q_TIMESPEC))
    return q[Q_TIMESPEC] * 1_000_000_000 + q[Q_TIMESPEC + 1]


@njit(nogil=True, cache=True, inline='always')
def _log2_bucket(ns):
    """The histogram bucket of a latency: its bit length (0 for <= 0),
    found in six steps rather than a loop over the bits."""
    if ns <= 0:
        return 0
    k = 0
    for s in (32, 16, 8, 4, 2, 1):
        if ns >> s:
            ns >>= s
            k += s
    return min(k + 1, LAT_BUCKETS - 1)


@njit(nogil=True, cache=True)
def _pop(mem, q, iov):
    """Pop the next available chain into ``iov`` (lguest's wait_for_vq_desc
    without the wait).  Returns the head index, NO_BUFFER, or -E_*.  On an
    error nothing is consumed: the queue state is as before the call."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        return _pop_packed(mem, q, iov)
    size = q[Q_SIZE]
    mem_size = mem.size
    avail = q[Q_AVAIL]
    last = q[Q_LAST_AVAIL]
    # Acquire: the ring entry and descriptors are read after the index.
    idx = ld_u16_acquire(mem, avail + 2)
    if idx == last:
        return NO_BUFFER
    if ((idx - last) & 0xFFFF) > size:
        return _fail(q, E_AVAIL_IDX)
    head = ld_u16(mem, avail + 4 + 2 * (last & (size - 1)))
    if head >= size:
        return _fail(q, E_HEAD_RANGE)
    if iov.shape[0] < size:
        return _fail(q, E_IOV_SHORT)

    table = q[Q_DESC]        # current descriptor table and its entry count
    entries = size
    indirect = False
    visited = 0              # descriptors walked in the current table
    n = 0                    # iov entries filled
    n_in = 0
    out_bytes = 0
    in_bytes = 0
    i = head
    while True:
        visited += 1
        if visited > entries:
            return _fail(q, E_CHAIN_LOOP)
        d = table + DESC_SIZE * i
        addr = ld_u64(mem, d)
        length = ld_u32(mem, d + 8)
        flags = ld_u16(mem, d + 12)
        if flags & VRING_DESC_F_INDIRECT:
            if not (q[Q_FEATURES] & _F_INDIRECT):
                return _fail(q, E_INDIRECT_FEATURE)
            if indirect:
                return _fail(q, E_INDIRECT_NESTED)
            if flags & VRING_DESC_F_NEXT:
                return _fail(q, E_INDIRECT_NEXT)
            if length == 0 or length % DESC_SIZE != 0:
                return _fail(q, E_INDIRECT_LEN)
            if length // DESC_SIZE > size:
                return _fail(q, E_INDIRECT_SIZE)
            if not in_ram(addr, length, mem_size):
                return _fail(q, E_INDIRECT_RANGE)
            # §2.4.5.3.2: the WRITE flag of the pointer itself is ignored.
            table = addr
            entries = length // DESC_SIZE
            indirect = True
            visited = 0
            i = 0
            continue
        if not in_ram(addr, length, mem_size):
            return _fail(q, E_BUF_RANGE)
        if n >= size:
            return _fail(q, E_CHAIN_LONG)
        if flags & VRING_DESC_F_WRITE:
            n_in += 1
            in_bytes += length
            iov[n, 2] = 1
        else:
            if n_in:
                return _fail(q, E_OUT_AFTER_IN)
            out_bytes += length
            iov[n, 2] = 0
        iov[n, 0] = addr
        iov[n, 1] = length
        n += 1
        if not (flags & VRING_DESC_F_NEXT):
            break
        i = ld_u16(mem, d + 14)
        if i >= entries:
            return _fail(q, E_NEXT_RANGE)

    # Latency start: entries before Q_LAT_SEEN were visible at Q_LAT_SEEN_NS;
    # a newer one is seen now (one clock read per batch the driver posted).
    every = q[Q_LAT_EVERY]
    if every and (q[Q_N_CHAINS] & (every - 1)) == 0:
        ahead = (q[Q_LAT_SEEN] - last) & 0xFFFF
        if ahead == 0 or ahead > size:
            q[Q_LAT_SEEN_NS] = q[Q_LAT_NOW_NS] if q[Q_LAT_NOW_NS] else _now_ns(q)
            q[Q_LAT_SEEN] = idx
        q[Q_LAT_CHAIN_NS] = q[Q_LAT_SEEN_NS]
    q[Q_LAST_AVAIL] = (last + 1) & 0xFFFF
    q[Q_OUT] = n - n_in
    q[Q_IN] = n_in
    q[Q_OUT_BYTES] = out_bytes
    q[Q_IN_BYTES] = in_bytes
    q[Q_N_CHAINS] += 1
    return head


# ---------------------------------------------------------------------------
# Packed ring kernels (§2.7).  _pop/_push/... call these when Q_LAYOUT says
# packed; everything read from the ring is checked here, as for split rings.

@njit(nogil=True, cache=True, inline='always')
def _packed_avail(flags, wrap):
    """§2.7.1: a descriptor is available in the lap whose wrap counter is
    ``wrap`` when its AVAIL bit equals it and its USED bit does not."""
    return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) != wrap


@njit(nogil=True, cache=True, inline='always')
def _pop_packed(mem, q, iov):
    """_pop for a packed ring: the list at the device's ring position, when
    its first descriptor is available (the driver exposes it last, §2.7.6).
    Returns ``id | slots << 16``, NO_BUFFER or -E_*; on an error nothing is
    consumed."""
    code = q[Q_EVENT_ERROR]
    if code != 0:
        q[Q_EVENT_ERROR] = 0
        return -code                  # counted when it was found
    size = q[Q_SIZE]
    mem_size = mem.size
    ring = q[Q_DESC]
    pos = q[Q_LAST_AVAIL]
    wrap = q[Q_AVAIL_WRAP]
    # Acquire: the rest of the list is read after the first flags (§2.7.21.1).
    flags = ld_u16_acquire(mem, ring + DESC_SIZE * pos + 14)
    if not _packed_avail(flags, wrap):
        return NO_BUFFER
    if iov.shape[0] < size:
        return _fail(q, E_IOV_SHORT)
    n = 0
    n_in = 0
    out_bytes = 0
    in_bytes = 0
    slots = 0
    bid = 0
    while True:
        d = ring + DESC_SIZE * pos
        if slots > 0:
            # §2.7.6: every descriptor of the list carries its own lap's bits.
            flags = ld_u16(mem, d + 14)
            if not _packed_avail(flags, wrap):
                return _fail(q, E_PACKED_NOT_AVAIL)
        slots += 1
        pos += 1
        if pos == size:
            pos = 0
            wrap ^= 1
        addr = ld_u64(mem, d)
        length = ld_u32(mem, d + 8)
        if flags & VRING_DESC_F_INDIRECT:
            if not (q[Q_FEATURES] & _F_INDIRECT):
                return _fail(q, E_INDIRECT_FEATURE)
            if slots > 1 or (flags & VRING_DESC_F_NEXT):
                return _fail(q, E_PACKED_INDIRECT_CHAIN)
            if length == 0 or length % DESC_SIZE != 0:
                return _fail(q, E_INDIRECT_LEN)
            entries = length // DESC_SIZE
            if entries > size:
                return _fail(q, E_INDIRECT_SIZE)
            if not in_ram(addr, length, mem_size):
                return _fail(q, E_INDIRECT_RANGE)
            # §2.7.7: the table's entries follow one another; WRITE is their
            # only flag (NEXT and the IDs are ignored), and the WRITE flag
            # of the pointer itself is ignored.
            for k in range(entries):
                e = addr + DESC_SIZE * k
                eflags = ld_u16(mem, e + 14)
                if eflags & VRING_DESC_F_INDIRECT:
                    return _fail(q, E_INDIRECT_NESTED)
                ea = ld_u64(mem, e)
                el = ld_u32(mem, e + 8)
                if not in_ram(ea, el, mem_size):
                    return _fail(q, E_BUF_RANGE)
                if eflags & VRING_DESC_F_WRITE:
                    n_in += 1
                    in_bytes += el
                    iov[n, 2] = 1
                else:
                    if n_in:
                        return _fail(q, E_OUT_AFTER_IN)
                    out_bytes += el
                    iov[n, 2] = 0
                iov[n, 0] = ea
                iov[n, 1] = el
                n += 1
            bid = ld_u16(mem, d + 12)
            break
        if not in_ram(addr, length, mem_size):
            return _fail(q, E_BUF_RANGE)
        if n >= size:
            return _fail(q, E_CHAIN_LONG)
        if flags & VRING_DESC_F_WRITE:
            n_in += 1
            in_bytes += length
            iov[n, 2] = 1
        else:
            if n_in:
                return _fail(q, E_OUT_AFTER_IN)
            out_bytes += length
            iov[n, 2] = 0
        iov[n, 0] = addr
        iov[n, 1] = length
        n += 1
        if not (flags & VRING_DESC_F_NEXT):
            bid = ld_u16(mem, d + 12)      # §2.7.6: the ID is in the last descriptor
            break
    word = Q_IDS + (bid >> 5)
    bit = np.int64(1) << (bid & 31)
    if q[word] & bit:
        return _fail(q, E_PACKED_ID_REUSE)
    q[word] |= bit
    # Latency start: no index tells how long the list has been there; it
    # was seen no later than now, or than the last push if we never waited.
    every = q[Q_LAT_EVERY]
    if every and (q[Q_N_CHAINS] & (every - 1)) == 0:
        q[Q_LAT_CHAIN_NS] = q[Q_LAT_NOW_NS] if q[Q_LAT_NOW_NS] else _now_ns(q)
    q[Q_LAST_AVAIL] = pos
    q[Q_AVAIL_WRAP] = wrap
    q[Q_LAST_SLOTS] = slots
    q[Q_LAST_ID] = bid
    q[Q_OUT] = n - n_in
    q[Q_IN] = n_in
    q[Q_OUT_BYTES] = out_bytes
    q[Q_IN_BYTES] = in_bytes
    q[Q_N_CHAINS] += 1
    return bid | (slots << 16)


@njit(nogil=True, cache=True, inline='always')
def _push_packed(mem, q, head, length):
    """One used descriptor for the whole list ``head`` (= id | slots << 16)
    at the device's used position: ID and length first, then the flags
    with release, so the driver never sees a used descriptor before its
    contents (§2.7.6, §2.7.22); then skip the list's other slots."""
    bid = head & 0xFFFF
    slots = head >> 16
    size = q[Q_SIZE]
    pos = q[Q_USED_IDX]
    d = q[Q_DESC] + DESC_SIZE * pos
    st_u32(mem, d + 8, length)
    st_u16(mem, d + 12, bid)
    flags = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if q[Q_USED_WRAP] else 0
    if length > 0:
        flags |= VRING_DESC_F_WRITE     # §2.7.3: the device wrote into the buffer
    st_u16_release(mem, d + 14, flags)
    pos += slots
    if pos >= size:
        pos -= size
        q[Q_USED_WRAP] ^= 1
    q[Q_USED_IDX] = pos
    q[Q_IDS + (bid >> 5)] &= ~(np.int64(1) << (bid & 31))
    q[Q_PENDING] += 1
    q[Q_PENDING_SLOTS] += slots
    q[Q_N_USED] += 1
    if q[Q_LAT_CHAIN_NS]:
        now = _now_ns(q)
        q[Q_LAT_HIST + _log2_bucket(now - q[Q_LAT_CHAIN_NS])] += 1
        q[Q_LAT_CHAIN_NS] = 0
        q[Q_LAT_NOW_NS] = now


@njit(nogil=True, cache=True)
def _need_interrupt_packed(mem, q):
    """_need_interrupt for a packed ring, from the driver event suppression
    structure (§2.7.10, §2.7.14): ENABLE, DISABLE, or with EVENT_IDX
    negotiated DESC, an interrupt once the used descriptor at off/wrap was
    written.  A broken rule is recorded for the next pop and answered with
    an interrupt (a spurious one is harmless, a lost one hangs the driver)."""
    fence()
    slots = q[Q_PENDING_SLOTS]
    q[Q_PENDING] = 0
    q[Q_PENDING_SLOTS] = 0
    drv = q[Q_AVAIL]
    mode = ld_u16_acquire(mem, drv + 2) & 3
    want = True
    if mode == RING_EVENT_FLAGS_DISABLE:
        want = False
    elif mode == RING_EVENT_FLAGS_DESC:
        if not (q[Q_FEATURES] & _F_EVENT_IDX):
            if q[Q_EVENT_ERROR] == 0:
                q[Q_EVENT_ERROR] = E_PACKED_EVENT_DESC
                _fail(q, E_PACKED_EVENT_DESC)
        else:
            size = q[Q_SIZE]
            if slots < size:
                # Positions of the lap before count from -size, as Linux's
                # virtqueue_kick_prepare_packed does; then vring_need_event.
                off_wrap = ld_u16(mem, drv)
                event = off_wrap & 0x7FFF
                if (off_wrap >> RING_EVENT_WRAP_SHIFT) != q[Q_USED_WRAP]:
                    event -= size
                new = q[Q_USED_IDX]
                want = _need_event(event & 0xFFFF, new, (new - slots) & 0xFFFF)
    elif mode == 3:
        if q[Q_EVENT_ERROR] == 0:
            q[Q_EVENT_ERROR] = E_PACKED_EVENT_FLAGS
            _fail(q, E_PACKED_EVENT_FLAGS)
    if want:
        q[Q_N_IRQ] += 1
    else:
        q[Q_N_IRQ_SUPPRESSED] += 1
    return want


@njit(nogil=True, cache=True)
def _enable_notify_packed(mem, q):
    """_enable_notify for a packed ring: the device event suppression
    structure asks for notifications (with EVENT_IDX: for the descriptor
    the device reads next, offset and wrap written before the flags), then
    the ring is checked again after a full fence."""
    dev = q[Q_USED]
    pos = q[Q_LAST_AVAIL]
    wrap = q[Q_AVAIL_WRAP]
    if q[Q_FEATURES] & _F_EVENT_IDX:
        st_u16(mem, dev, pos | (wrap << RING_EVENT_WRAP_SHIFT))
        st_u16_release(mem, dev + 2, RING_EVENT_FLAGS_DESC)
    else:
        st_u16(mem, dev + 2, RING_EVENT_FLAGS_ENABLE)
    fence()
    return _packed_avail(ld_u16_acquire(mem, q[Q_DESC] + DESC_SIZE * pos + 14), wrap)


@njit(nogil=True, cache=True)
def _push(mem, q, head, length):
    """Write a used element (not yet visible: see _publish; a packed ring's
    used descriptor is visible at once)."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        _push_packed(mem, q, head, length)
        return
    used = q[Q_USED]
    idx = q[Q_USED_IDX]
    elem = used + 4 + 8 * (idx & (q[Q_SIZE] - 1))
    st_u32(mem, elem, head)
    st_u32(mem, elem + 4, length)
    q[Q_USED_IDX] = (idx + 1) & 0xFFFF
    q[Q_PENDING] += 1
    q[Q_N_USED] += 1
    # The element is published right after (complete): its latency ends here.
    if q[Q_LAT_CHAIN_NS]:
        now = _now_ns(q)
        q[Q_LAT_HIST + _log2_bucket(now - q[Q_LAT_CHAIN_NS])] += 1
        q[Q_LAT_CHAIN_NS] = 0
        q[Q_LAT_NOW_NS] = now


@njit(nogil=True, cache=True)
def _publish(mem, q):
    """Make every pushed element visible: release-store used.idx, so the
    driver never sees an index ahead of its elements (§2.4.8.2).  A packed
    ring has no index: each used descriptor was published by its flags."""
    if q[Q_LAYOUT] == LAYOUT_SPLIT:
        st_u16_release(mem, q[Q_USED] + 2, q[Q_USED_IDX])


@njit(nogil=True, cache=True)
def _need_event(event, new, old):
    # Linux's vring_need_event: did new pass event since old?  16-bit wrap.
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@njit(nogil=True, cache=True)
def _need_interrupt(mem, q):
    """After _publish: does the driver want an interrupt for what was used
    since the last decision?  (§2.4.7.2; lguest's trigger_irq test.)"""
    if q[Q_PENDING] == 0:
        return False
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        return _need_interrupt_packed(mem, q)
    # The used.idx store must be globally visible before we read the
    # driver's suppression state, or both sides can decide to sleep.
    fence()
    new = q[Q_USED_IDX]
    old = q[Q_SIGNALLED]
    q[Q_SIGNALLED] = new
    q[Q_PENDING] = 0
    size = q[Q_SIZE]
    avail = q[Q_AVAIL]
    if q[Q_FEATURES] & _F_EVENT_IDX:
        want = _need_event(ld_u16(mem, avail + 4 + 2 * size), new, old)
    else:
        want = (ld_u16(mem, avail) & VRING_AVAIL_F_NO_INTERRUPT) == 0
    if want:
        q[Q_N_IRQ] += 1
    else:
        q[Q_N_IRQ_SUPPRESSED] += 1
    return want


@njit(nogil=True, cache=True)
def _disable_notify(mem, q):
    """Ask the driver not to notify us (we are busy polling).  With
    EVENT_IDX nothing is written: avail_event simply stays behind (§2.4.9).
    A packed ring's device event flags say DISABLE (§2.7.10)."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        st_u16(mem, q[Q_USED] + 2, RING_EVENT_FLAGS_DISABLE)
    elif not (q[Q_FEATURES] & _F_EVENT_IDX):
        used = q[Q_USED]
        st_u16(mem, used, ld_u16(mem, used) | VRING_USED_F_NO_NOTIFY)


@njit(nogil=True, cache=True)
def _enable_notify(mem, q):
    """Ask for notifications again, then re-check the ring: returns True when
    buffers arrived meanwhile, in which case the caller must not sleep (the
    race lguest closes with mb())."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        return _enable_notify_packed(mem, q)
    used = q[Q_USED]
    last = q[Q_LAST_AVAIL]
    if q[Q_FEATURES] & _F_EVENT_IDX:
        st_u16(mem, used + 4 + 8 * q[Q_SIZE], last)
    else:
        st_u16(mem, used, ld_u16(mem, used) & (0xFFFF ^ VRING_USED_F_NO_NOTIFY))
    fence()
    return ld_u16_acquire(mem, q[Q_AVAIL] + 2) != last


@njit(nogil=True, cache=True)
def _signal(mem, q, isr, irq, scratch):
    """lguest's trigger_irq: if the driver wants an interrupt for what we
    used, raise it (``raise_irq``: the queue's MSI-X vector, or the ISR bit
    and INTx).  Returns True if raised."""
    if not _need_interrupt(mem, q):
        return False
    r = raise_irq(isr, irq, scratch, q[Q_VECTOR], ISR_QUEUE)
    if r == IRQ_MASKED:
        q[Q_N_IRQ_MASKED] += 1
    elif r == IRQ_NO_VECTOR:
        q[Q_N_IRQ_NO_VECTOR] += 1
    return r == IRQ_SENT


@njit(nogil=True, cache=True)
def _poll_avail(mem, q):
    """Spin up to Q_POLL_SPINS times for avail.idx to move; False when it
    did not, or when the launcher asked the queue to stop."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        # Packed: the flags of the next descriptor are the index (§2.7.2).
        at = q[Q_DESC] + DESC_SIZE * q[Q_LAST_AVAIL] + 14
        wrap = q[Q_AVAIL_WRAP]
        for _ in range(q[Q_POLL_SPINS]):
            if q[Q_STOP]:
                return False
            if _packed_avail(ld_u16_acquire(mem, at), wrap):
                return True
            cpu_relax()
        return False
    avail_idx = q[Q_AVAIL] + 2
    last = q[Q_LAST_AVAIL]
    for _ in range(q[Q_POLL_SPINS]):
        if q[Q_STOP]:
            return False
        if ld_u16_acquire(mem, avail_idx) != last:
            return True
        cpu_relax()
    return False


@njit(nogil=True, cache=True)
def _spin(mem, n):
    # Calibration: the same loop as _poll_avail, on an index that never moves.
    k = 0
    for _ in range(n):
        if ld_u16_acquire(mem, 0) == 0xFFFF + 1:
            break
        cpu_relax()
        k += 1
    return k


_spins_per_us = None


def spins_for(microseconds: float) -> int:
    """How many busy-poll iterations last about ``microseconds`` here
    (measured once per process)."""
    global _spins_per_us
    if _spins_per_us is None:
        import time
        probe = np.zeros(2, dtype=np.uint8)
        _spin(probe, 1000)
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            _spin(probe, 200_000)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        _spins_per_us = 200_000 / max(best * 1e6, 1e-3)
    return max(0, int(microseconds * _spins_per_us))


@njit(nogil=True, cache=True)
def _wait_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch):
    """lguest's wait_for_vq_desc: pop the next chain, sleeping on the
    queue's notification eventfd while the ring is empty.  Before sleeping,
    tell the driver about everything used so far.  Returns the head,
    STOPPED once ``q[Q_STOP]`` is set, or -E_*."""
    while True:
        head = _pop(mem, q, iov)
        if head != NO_BUFFER:
            return head
        q[Q_LAT_NOW_NS] = 0      # about to wait: the last push's time goes stale
        _publish(mem, q)
        _signal(mem, q, isr, irq_fd, scratch)
        if q[Q_EVENT_ERROR]:
            continue             # a packed ring's event rule broken: the pop reports it
        # Busy-poll a little before paying for a sleep and a wake-up (as
        # vhost's busyloop does): a driver that answers our interrupt with
        # a new request at once never has to notify us.
        if q[Q_POLL_SPINS] and _poll_avail(mem, q):
            q[Q_N_POLL_HITS] += 1
            continue
        if q[Q_STOP]:
            return STOPPED
        if _enable_notify(mem, q):
            _disable_notify(mem, q)
            continue
        if q[Q_STOP]:
            return STOPPED
        r = sys_read(notify_fd, scratch.ctypes.data, 8)
        if r < 0 and r != -EINTR and r != -EAGAIN:
            return _fail(q, E_NOTIFY_READ)
        q[Q_N_NOTIFY] += 1
        _disable_notify(mem, q)
        if q[Q_STOP]:
            return STOPPED


# ---------------------------------------------------------------------------
# The device side of the protocol, as public kernels a device's own service
# kernel calls (a generic loop taking a handler would be recompiled at every
# start: see HACKING.md).  A queue thread is
#
#     while True:
#         head = next_chain(mem, q, iov, notify_fd, isr, irq, scratch, shape, header)
#         if head < 0:
#             break
#         ... the device's own I/O on iov ...
#         complete(mem, q, head, used_length, payload_bytes)
#     return finish(mem, q, isr, irq, scratch, head)
#
# (``irq``: the INTx eventfd or the device's MSI-X state, see raise_irq)
# and everything queue-shaped (waiting, the chain's shape, used elements,
# interrupts, handing a chain back) happens here.  These kernels are inlined
# into their callers (inline='always'): a call between separately compiled
# kernels that pass arrays costs ~100 ns here, as much as a small request.

# Chain shapes (``shape`` of next_chain).  ``header`` is the least number of
# bytes the first part must hold.
CHAIN_ANY = 0         # no rule beyond the ring's own
CHAIN_READABLE = 1    # device-readable buffers only (transmit queues); header in them
CHAIN_WRITABLE = 2    # device-writable buffers only (receive queues, entropy); header in them
CHAIN_REQUEST = 3     # readable header (+ data), writable part ending in a status byte (block)


@njit(nogil=True, cache=True, inline='always')
def shape_error(q, iov, shape, header):
    """OK, or the E_* code of the first shape rule (``CHAIN_*``) the chain
    just popped into ``q``/``iov`` breaks; ``next_chain`` applies it to every
    chain, and a harness that pops chains itself applies it the same way."""
    if shape == CHAIN_READABLE:
        if q[Q_IN] != 0:
            return E_CHAIN_WRITABLE
        if q[Q_OUT_BYTES] < header:
            return E_SHORT_HEADER
    elif shape == CHAIN_WRITABLE:
        if q[Q_OUT] != 0:
            return E_CHAIN_READABLE
        if q[Q_IN_BYTES] < header:
            return E_SHORT_HEADER
    elif shape == CHAIN_REQUEST:
        # §5.2.6: the status byte is the last byte of the last descriptor,
        # which must be device-writable.
        if q[Q_IN] == 0 or iov[q[Q_OUT] + q[Q_IN] - 1, 1] == 0:
            return E_NO_STATUS
        if q[Q_OUT_BYTES] < header:
            return E_SHORT_HEADER
    return OK


@njit(nogil=True, cache=True, inline='always')
def next_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch, shape, header):
    """Wait for the next chain (signalling what was used before sleeping)
    and check it has the ``shape`` the device needs (``CHAIN_*``, at least
    ``header`` bytes in its first part).  Returns the head, STOPPED once the
    launcher set ``q[Q_STOP]``, or -E_* (counted in Q_N_ERRORS)."""
    if q[Q_STOP]:
        return STOPPED
    head = _wait_chain(mem, q, iov, notify_fd, isr, irq_fd, scratch)
    if head < 0:
        return head
    err = shape_error(q, iov, shape, header)
    if err != OK:
        return _fail(q, err)
    return head


@njit(nogil=True, cache=True, inline='always')
def complete(mem, q, head, length, nbytes):
    """Give chain ``head`` back with ``length`` bytes written into it, and
    count ``nbytes`` of payload moved.  The counter goes first, so it is
    current by the time the driver sees the buffer."""
    q[Q_N_BYTES] += nbytes
    _push(mem, q, head, length)
    _publish(mem, q)


@njit(nogil=True, cache=True, inline='always')
def notify_used(mem, q, isr, irq_fd, scratch):
    """Publish everything used and interrupt the driver if it wants it (a
    thread about to sleep somewhere other than next_chain calls this
    first).  Returns True if the interrupt was raised."""
    q[Q_LAT_NOW_NS] = 0      # the thread waits next: the last push's time goes stale
    _publish(mem, q)
    return _signal(mem, q, isr, irq_fd, scratch)


@njit(nogil=True, cache=True, inline='always')
def finish(mem, q, isr, irq_fd, scratch, code):
    """A queue thread's last call: what completed must reach the driver
    before the thread goes.  Returns ``code``."""
    notify_used(mem, q, isr, irq_fd, scratch)
    return code


@njit(nogil=True, cache=True, inline='always')
def unpop(q):
    """Hand the chain popped last back to the ring unused (the device ran
    out of input for it).  The device's avail index is private, so stepping
    it back is invisible to the driver; the chain is popped again next
    (a packed ring's position steps back over the chain's slots, and the
    device no longer holds its buffer ID)."""
    if q[Q_LAYOUT] != LAYOUT_SPLIT:
        pos = q[Q_LAST_AVAIL] - q[Q_LAST_SLOTS]
        if pos < 0:
            pos += q[Q_SIZE]
            q[Q_AVAIL_WRAP] ^= 1
        q[Q_LAST_AVAIL] = pos
        bid = q[Q_LAST_ID]
        q[Q_IDS + (bid >> 5)] &= ~(np.int64(1) << (bid & 31))
    else:
        q[Q_LAST_AVAIL] = (q[Q_LAST_AVAIL] - 1) & 0xFFFF
    q[Q_N_CHAINS] -= 1


# ---------------------------------------------------------------------------
# iovec helpers (lguest's iov_consume and friends).  Entries were checked
# against guest RAM when the chain was popped.

@njit(nogil=True, cache=True, inline='always')
def _iov_copy(mem, iov, first, count, buf, length, to_guest):
    # Up to ``length`` bytes between ``buf`` and iov[first:first+count], in
    # order, until either side runs out; returns bytes copied.
    done = 0
    length = min(length, buf.size)
    for k in range(first, first + count):
        if done >= length:
            break
        a = np.int64(iov[k, 0])
        n = min(np.int64(iov[k, 1]), length - done)
        # Byte loops: these are headers, ids and segment tables of a few
        # bytes, where slice assignment costs ~100 ns more than the copy.
        if to_guest:
            for j in range(n):
                mem[a + j] = buf[done + j]
        else:
            for j in range(n):
                buf[done + j] = mem[a + j]
        done += n
    return done


@njit(nogil=True, cache=True, inline='always')
def iov_to_buf(mem, iov, first, count, buf):
    """Copy from iov[first:first+count] into ``buf``; returns bytes copied
    (stops when either side is exhausted)."""
    return _iov_copy(mem, iov, first, count, buf, buf.size, False)


@njit(nogil=True, cache=True, inline='always')
def buf_to_iov(mem, iov, first, count, buf, length):
    """Copy ``length`` bytes of ``buf`` into iov[first:first+count]; returns
    bytes copied."""
    return _iov_copy(mem, iov, first, count, buf, length, True)


@njit(nogil=True, cache=True, inline='always')
def iov_consume(iov, first, count, nbytes):
    """Drop ``nbytes`` from the front of iov[first:first+count] in place
    (for headers); returns the bytes actually consumed."""
    done = 0
    for k in range(first, first + count):
        if done >= nbytes:
            break
        n = min(np.int64(iov[k, 1]), nbytes - done)
        iov[k, 0] = np.uint64(np.int64(iov[k, 0]) + n)
        iov[k, 1] = np.uint64(np.int64(iov[k, 1]) - n)
        done += n
    return done


@njit(nogil=True, cache=True, inline='always')
def iov_advance(iov, k, n, nbytes):
    """After a short readv/writev (or preadv/pwritev) over rows k..n-1 of a
    (guest or host) iovec: step past the ``nbytes`` done, trimming a row
    done in part, and return the first row with bytes left (n: all done)."""
    while k < n and nbytes >= np.int64(iov[k, 1]):
        nbytes -= np.int64(iov[k, 1])
        k += 1
    if k < n and nbytes > 0:
        iov[k, 0] = iov[k, 0] + np.uint64(nbytes)
        iov[k, 1] = iov[k, 1] - np.uint64(nbytes)
    return k


@njit(nogil=True, cache=True)
def _last_writable_byte(iov, first, count):
    """Guest address of the last byte of the last non-empty writable entry
    (where a block request's status byte goes), or -1."""
    for k in range(first + count - 1, first - 1, -1):
        if iov[k, 2] and iov[k, 1] > 0:
            return np.int64(iov[k, 0]) + np.int64(iov[k, 1]) - 1
    return -1


# ---------------------------------------------------------------------------
# Public wrappers: validate, then call the kernel.


def new_iov(size: int) -> np.ndarray:
    return np.zeros((size, 3), dtype=np.uint64)


def _check(mem, q):
    if not isinstance(mem, np.ndarray) or mem.dtype != np.uint8 or mem.ndim != 1:
        raise TypeError("mem must be the guest's 1-D uint8 array")
    if q.dtype != np.int64 or q.shape != (Q_FIELDS,):
        raise TypeError("q must be a queue state array from new_queue()")
    if q[Q_SIZE] == 0:
        raise ValueError("queue is not set up")


def pop(mem, q, iov) -> int:
    """Pop the next chain.  Returns head, NO_BUFFER or -E_* (see error_message)."""
    _check(mem, q)
    if iov.dtype != np.uint64 or iov.ndim != 2 or iov.shape[1] != 3:
        raise TypeError("iov must be an (n, 3) uint64 array from new_iov()")
    return int(_pop(mem, q, iov))


def push(mem, q, head: int, length: int) -> None:
    """Record a used chain; not visible to the driver until publish()."""
    _check(mem, q)
    if q[Q_LAYOUT] == LAYOUT_PACKED:
        if not 1 <= head >> 16 <= q[Q_SIZE]:
            raise ValueError(f"head {head:#x} is not a buffer ID with 1 to {q[Q_SIZE]} ring slots")
    elif not 0 <= head < q[Q_SIZE]:
        raise ValueError(f"head {head} outside queue of size {q[Q_SIZE]}")
    if not 0 <= length < 2**32:
        raise ValueError(f"used length {length} is not a u32")
    _push(mem, q, head, length)


def publish(mem, q) -> None:
    _check(mem, q)
    _publish(mem, q)


def need_interrupt(mem, q) -> bool:
    _check(mem, q)
    return bool(_need_interrupt(mem, q))


def enable_notify(mem, q) -> bool:
    _check(mem, q)
    return bool(_enable_notify(mem, q))


def disable_notify(mem, q) -> None:
    _check(mem, q)
    _disable_notify(mem, q)


def need_event(event: int, new: int, old: int) -> bool:
    return bool(_need_event(event, new, old))


def chain(iov, q) -> list[tuple[int, int, bool]]:
    """The last popped chain as (guest address, length, writable) tuples."""
    n = int(q[Q_OUT] + q[Q_IN])
    return [(int(a), int(ln), bool(w)) for a, ln, w in iov[:n]]


def latency_summary(hist) -> dict:
    """count, p50 and p99 (nanoseconds) of a latency histogram
    (``q[Q_LAT_HIST:Q_LAT_HIST + LAT_BUCKETS]``).  A percentile is the upper
    bound of the bucket holding it: the latency is at most that."""
    hist = [int(c) for c in hist]
    total = sum(hist)
    out = {"count": total}
    for name, p in (("p50_ns", 0.50), ("p99_ns", 0.99)):
        if total == 0:
            out[name] = None
            continue
        rank = max(1, -(-int(p * 1000) * total // 1000))      # ceil(p * total), in integers
        seen = 0
        for k, c in enumerate(hist):
            seen += c
            if seen >= rank:
                out[name] = (1 << k) - 1
                break
    return out


def counters(q) -> dict:
    return {"chains": int(q[Q_N_CHAINS]), "used": int(q[Q_N_USED]), "notifications": int(q[Q_N_NOTIFY]),
            "interrupts": int(q[Q_N_IRQ]), "interrupts_suppressed": int(q[Q_N_IRQ_SUPPRESSED]),
            "errors": int(q[Q_N_ERRORS]), "bytes": int(q[Q_N_BYTES]), "latency": latency(q)}


def latency(q) -> dict:
    """The queue's latency histogram summed up (``latency_summary``), with
    its buckets up to the last non-empty one (``log2_ns``: bucket k counts
    latencies of 2**(k-1) .. 2**k - 1 ns)."""
    hist = [int(c) for c in q[Q_LAT_HIST:Q_LAT_HIST + LAT_BUCKETS]]
    while hist and hist[-1] == 0:
        hist.pop()
    return {**latency_summary(hist), "log2_ns": hist}
