"""A virtqueue's state as Python sees it: the named fields a snapshot
saves and restores (checked like any untrusted input), and what --stats
reports (counters, the latency histogram summed up).  The queue array and
its fields are vring's; nothing here runs per request.
"""
from __future__ import annotations

import numpy as np

from .vring import (E_SNAPSHOT_STATE, IDS_WORDS, LAT_BUCKETS, LAYOUT_PACKED, LAYOUT_SPLIT, MAX_QUEUE_SIZE, OK,
                    Q_AVAIL, Q_AVAIL_WRAP, Q_DESC, Q_ERROR, Q_FEATURES, Q_IDS, Q_LAST_AVAIL, Q_LAT_HIST, Q_LAYOUT,
                    Q_N_BYTES, Q_N_CHAINS, Q_N_ERRORS, Q_N_IRQ, Q_N_IRQ_MASKED, Q_N_IRQ_NO_VECTOR,
                    Q_N_IRQ_SUPPRESSED, Q_N_NOTIFY, Q_N_POLL_HITS, Q_N_USED, Q_PENDING, Q_PENDING_SLOTS,
                    Q_SIGNALLED, Q_SIZE, Q_USED, Q_USED_IDX, Q_USED_WRAP, VIRTIO_F_RING_PACKED, setup_queue)


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
            "errors": int(q[Q_N_ERRORS]), "bytes": int(q[Q_N_BYTES]), "poll_hits": int(q[Q_N_POLL_HITS]),
            "latency": latency(q)}


def latency(q) -> dict:
    """The queue's latency histogram summed up (``latency_summary``), with
    its buckets up to the last non-empty one (``log2_ns``: bucket k counts
    latencies of 2**(k-1) .. 2**k - 1 ns)."""
    hist = [int(c) for c in q[Q_LAT_HIST:Q_LAT_HIST + LAT_BUCKETS]]
    while hist and hist[-1] == 0:
        hist.pop()
    return {**latency_summary(hist), "log2_ns": hist}
