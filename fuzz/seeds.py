"""Writes the seed corpus (fuzz/corpus/<target>/): hand-built inputs that
reach each target's interesting paths, so fuzzing and the CI smoke start
from valid requests.  ``python -m fuzz.seeds``."""
from __future__ import annotations

import os
import struct

from .common import HERE
from .ring import DATA, PAYLOAD

NEXT, WRITE, INDIRECT = 1, 2, 4


def ring(bufs, size_log2=3, flags=3, start=0, extra=(), n_avail=1, heads=(0,)):
    """Encode a Ring (see ring.Ring): ``bufs`` the descriptor table as
    (addr, len, flags, next); ``extra`` up to 4 indirect-table descriptors."""
    size = 1 << size_log2
    out = bytes([size_log2, flags]) + struct.pack("<H", start)
    table = list(bufs) + [(DATA, 0, 0, 0)] * (size - len(bufs))
    ind = list(extra) + [(DATA, 0, 0, 0)] * (4 - len(extra))
    for addr, ln, fl, nxt in table + ind:
        if DATA <= addr < 0x10000:
            kind = 0x20 | fl
            out += bytes([kind]) + struct.pack("<H", addr - DATA)
        else:
            kind = 0xE0 | fl
            out += bytes([kind]) + struct.pack("<Q", addr)
        out += struct.pack("<H", ln) + bytes([nxt])
    out += struct.pack("<H", 0) + bytes([n_avail]) + bytes(list(heads) + [0] * (size - len(heads)))
    return out


def packed(descs, size=8, feats=7, pos=0, ind=(), ops=b""):
    """Encode a fuzz_packed input (``feats`` 7: indirect, event idx, wrap
    counters 1): ``descs`` ring slots as (data offset,
    length, flags & 7, id, marks selector: 0 this lap's, 3 the other lap's,
    4 used), ``ind`` up to 8 indirect-table entries, then the program."""
    out = bytes([size - 1, feats, pos])

    def one(off, ln, fl, bid, marks):
        return bytes([0x20 | fl]) + struct.pack("<HH", off, ln) + bytes([marks | bid << 3])
    slots = list(descs) + [(0, 0, 0, 0, 4)] * (size - len(descs))
    out += b"".join(one(*d) for d in slots)
    table = list(ind) + [(0, 0, 0, 0, 0)] * (8 - len(ind))
    out += b"".join(bytes([1]) + one(*d) for d in table)
    return out + ops


POP, USE = bytes([0]), bytes([1, 0]) + struct.pack("<H", 8)


def blk_req(rtype, sector, data_len, payload=b"", readonly=0):
    hdr = struct.pack("<IIQ", rtype, 0, sector) + payload
    bufs = [(PAYLOAD, len(hdr), NEXT, 1)]
    if data_len:
        bufs.append((PAYLOAD + 0x400, data_len, WRITE | NEXT, 2))
    bufs.append((PAYLOAD + 0x2000, 1, WRITE, 0))
    return bytes([readonly, 5]) + ring(bufs) + hdr


def net_rx(frames, bufs, **kw):
    """A fuzz_net receive input: ``frames`` as (body length, num_buffers)
    the fake tap delivers, then the ring."""
    out = bytes([1, len(frames) - 1])
    for k, (size, nbuf) in enumerate(frames):
        out += struct.pack("<H", size) + bytes(10) + struct.pack("<H", nbuf) + bytes([k])
    return out + ring(bufs, **kw)


def net_ctrl(pairs, bufs, payload=b"", **kw):
    """A fuzz_net control-queue input: a device offering ``pairs`` pairs
    (0: MQ not negotiated), the ring, then the command bytes."""
    return bytes([2 | pairs << 2]) + ring(bufs, **kw) + payload


def msix_program() -> bytes:
    """fuzz_pci ops playing Linux's MSI-X set-up on the first device: enable
    with the function masked (conf1 dword at the capability, 0x98), program
    entry 0 and unmask it, a config interrupt while masked, unmask the
    function, read the PBA."""
    def ctl(value):      # conf1 cycle, 4-byte write of u32 at register 0x98
        return bytes([0x87, 0, 0, 0x98, 0, 0, 0]) + struct.pack("<I", value << 16)

    def mmio_write(off, value, size=4):
        return bytes([{2: 0x4C, 4: 0x8C}[size], 0]) + struct.pack("<HQ", off, value)
    return b"".join([ctl(0xC000), mmio_write(0x1000, 0xFEE00000), mmio_write(0x1008, 0x41),
                     mmio_write(0x100C, 0), mmio_write(0x10, 0, 2), bytes([0x38, 0, 0, 0]), ctl(0x8000),
                     bytes([0x80, 0]) + struct.pack("<H", 0x1800), bytes(16)])


def msix_config_program() -> bytes:
    """fuzz_pci ops: MSI-X on with entry 0 unmasked and msix_config = 0,
    then config interrupts that must go to vector 0 (function unmasked),
    nowhere (msix_config = NO_VECTOR), and to its pending bit (entry 0
    masked) until the entry is unmasked."""
    def ctl(value):
        return bytes([0x87, 0, 0, 0x98, 0, 0, 0]) + struct.pack("<I", value << 16)

    def mmio_write(off, value, size=4):
        return bytes([{2: 0x4C, 4: 0x8C}[size], 0]) + struct.pack("<HQ", off, value)
    config = bytes([0x38, 0, 0, 0])
    return b"".join([ctl(0xC000), mmio_write(0x1000, 0xFEE00000), mmio_write(0x1008, 0x41),
                     mmio_write(0x100C, 0), mmio_write(0x10, 0, 2), ctl(0x8000), config,
                     mmio_write(0x10, 0xFFFF, 2), config, mmio_write(0x10, 0, 2), mmio_write(0x100C, 1), config,
                     mmio_write(0x100C, 0), config, bytes(16)])


def seeds():
    s = {}
    s["vring"] = {
        "one": ring([(PAYLOAD, 16, 0, 0)]),
        "chain": ring([(PAYLOAD, 16, NEXT, 1), (PAYLOAD + 64, 32, WRITE, 0)]),
        "indirect": ring([(DATA, 32, INDIRECT, 0)], extra=[(PAYLOAD, 8, NEXT, 1), (PAYLOAD + 8, 8, WRITE, 0)]),
        "loop": ring([(PAYLOAD, 16, NEXT, 1), (PAYLOAD, 16, NEXT, 0)]),
        "two": ring([(PAYLOAD, 4, 0, 0), (PAYLOAD + 4, 4, WRITE, 0)], n_avail=2, heads=(0, 1)),
        "wrap": ring([(PAYLOAD, 4, 0, 0)], start=0xFFFF, n_avail=2, heads=(0, 0)),
        "outside": ring([(0xFFFFFFFFFFFFF000, 0x2000, 0, 0)]),
    }
    s["packed"] = {
        "one": packed([(0x100, 16, 0, 1, 0)], ops=POP + USE + POP),
        "list": packed([(0x100, 16, NEXT, 2, 0), (0x200, 8, WRITE, 2, 0)], ops=POP + USE + bytes([4, 0, 0, 0])),
        "indirect": packed([(0, 32, INDIRECT, 3, 0)], ind=[(0x300, 8, 0, 0, 0), (0x400, 8, WRITE, 0, 0)],
                           ops=POP + USE),
        "wrap": packed([(0x100, 4, 0, 1, 0)] * 3 + [(0x100, 4, NEXT, 2, 0)], size=4, pos=3,
                       ops=POP + USE + POP + USE),
        "reuse": packed([(0x100, 4, 0, 5, 0), (0x100, 4, 0, 5, 0)], ops=POP + POP),
        "not_avail": packed([(0x100, 4, NEXT, 1, 0), (0x100, 4, 0, 1, 3)], ops=POP),
        "event_desc": packed([(0x100, 4, 0, 1, 0), (0x100, 4, 0, 2, 0)],
                             ops=POP + USE + bytes([4, 1, 0x80, 2]) + POP + USE + bytes([4, 1, 0x80, 2])),
        "unpop": packed([(0x100, 4, WRITE, 1, 0)], size=5, ops=POP + bytes([2]) + POP + USE),
    }
    s["blk"] = {
        "read": blk_req(0, 2, 1024),
        "write": blk_req(1, 3, 0, payload=bytes(range(256)) * 2),
        "write_ro": blk_req(1, 3, 0, payload=bytes(512), readonly=1),
        "past_end": blk_req(0, 15, 1024),
        "flush": blk_req(4, 0, 0),
        "get_id": blk_req(8, 0, 20),
        "discard": blk_req(11, 0, 0, payload=struct.pack("<QII", 2, 4, 0)),
        "zeroes": blk_req(13, 0, 0, payload=struct.pack("<QII", 8, 8, 1)),
        "unsupported": blk_req(99, 0, 0),
        "no_status": bytes([0, 5]) + ring([(PAYLOAD, 16, 0, 0)]),
    }
    s["rng"] = {
        "fill": bytes([64]) + ring([(PAYLOAD, 100, WRITE | NEXT, 1), (PAYLOAD + 200, 300, WRITE, 0)]),
        "readable": bytes([8]) + ring([(PAYLOAD, 100, 0, 0)]),
        "capped": bytes([1]) + ring([(PAYLOAD, 0x1000, WRITE, 0)]),
    }

    def vsock(*pkts):
        # count, then per packet: kind, op, payload length, payload, flags, fwd_cnt?, splits
        out = bytes([len(pkts) - 1])
        for kind, op, payload in pkts:
            out += bytes([kind, op]) + struct.pack("<H", len(payload)) + payload + bytes([0])
            out += struct.pack("<I", 0) if kind & 4 else b""
            out += bytes([0])
        return out
    s["vsock"] = {
        "rw": vsock((0, 0, b"hello"), (1, 0, b"x" * 2000)),
        "request": vsock((2, 1, b"")),
        "credit": vsock((2, 7, b""), (6, 6, b"")),
        "shutdown_then_rw": vsock((2, 4, b""), (0, 0, b"late")),
        "bad_op": vsock((2, 8, b"")),
        "rst": vsock((3, 3, b""), (1, 0, b"gone")),
    }
    hdr = bytes(10) + struct.pack("<H", 0)          # virtio_net_hdr_v1: no offloads
    s["net"] = {
        "tx": bytes([0]) + ring([(PAYLOAD, 12, NEXT, 1), (PAYLOAD + 12, 60, 0, 0)]) + hdr + bytes(range(60)),
        "tx_split_hdr": bytes([0]) + ring([(PAYLOAD, 5, NEXT, 1), (PAYLOAD + 5, 67, 0, 0)]) + hdr + b"f" * 60,
        "tx_two": bytes([0]) + ring([(PAYLOAD, 74, 0, 0), (PAYLOAD + 0x100, 100, 0, 0)], n_avail=2,
                                    heads=(0, 1)) + hdr + b"x" * 62,
        "tx_indirect": bytes([0]) + ring([(DATA, 32, INDIRECT, 0)], extra=[(PAYLOAD, 12, NEXT, 1),
                                                                           (PAYLOAD + 12, 200, 0, 0)]) + hdr,
        "tx_writable": bytes([0]) + ring([(PAYLOAD, 12, NEXT, 1), (PAYLOAD + 12, 60, WRITE, 0)]),
        "tx_short_hdr": bytes([0]) + ring([(PAYLOAD, 8, 0, 0)]),
        "tx_oversize": bytes([0]) + ring([(PAYLOAD, 0x1FFF, NEXT, k + 1) for k in range(7)]
                                         + [(PAYLOAD, 0x1FFF, 0, 0)]),
        "rx": net_rx([(60, 0)], [(PAYLOAD, 1526, WRITE, 0)]),
        "rx_split": net_rx([(300, 7)], [(PAYLOAD, 12, WRITE | NEXT, 1), (PAYLOAD + 0x100, 1514, WRITE, 0)]),
        "rx_small_buf": net_rx([(1500, 1)], [(PAYLOAD, 100, WRITE, 0)]),
        "rx_many": net_rx([(60, 0), (70, 0), (80, 0)], [(PAYLOAD + 0x200 * k, 200, WRITE, 0) for k in range(4)],
                          n_avail=4, heads=(0, 1, 2, 3)),
        "rx_readable": net_rx([(60, 0)], [(PAYLOAD, 12, NEXT, 1), (PAYLOAD + 12, 100, WRITE, 0)]),
        "rx_no_hdr": net_rx([(60, 0)], [(PAYLOAD, 10, WRITE, 0)]),
        "rx_no_frame": net_rx([(60, 0)], [(PAYLOAD, 200, WRITE, 0), (PAYLOAD + 0x200, 200, WRITE, 0)],
                              n_avail=2, heads=(0, 1)),
        # The control queue (mode 2 | pairs << 2): header, data, ack.
        "ctrl_pairs_set": net_ctrl(2, [(PAYLOAD, 2, NEXT, 1), (PAYLOAD + 2, 2, NEXT, 2), (PAYLOAD + 0x40, 1, WRITE, 0)],
                                   b"\x04\x00\x02\x00"),
        "ctrl_bad_class": net_ctrl(2, [(PAYLOAD, 3, NEXT, 1), (PAYLOAD + 0x40, 1, WRITE, 0)], b"\x00\x00\x01"),
        "ctrl_bad_length": net_ctrl(3, [(PAYLOAD, 5, NEXT, 1), (PAYLOAD + 0x40, 1, WRITE, 0)], b"\x04\x00\x02\x00\x00"),
        "ctrl_too_many": net_ctrl(2, [(PAYLOAD, 4, NEXT, 1), (PAYLOAD + 0x40, 1, WRITE, 0)], b"\x04\x00\x03\x00"),
        "ctrl_no_mq": net_ctrl(0, [(PAYLOAD, 4, NEXT, 1), (PAYLOAD + 0x40, 1, WRITE, 0)], b"\x04\x00\x01\x00"),
        "ctrl_no_ack": net_ctrl(2, [(PAYLOAD, 4, 0, 0)], b"\x04\x00\x01\x00"),
        "ctrl_short": net_ctrl(2, [(PAYLOAD, 1, NEXT, 1), (PAYLOAD + 0x40, 1, WRITE, 0)], b"\x04"),
    }
    s["console"] = {
        "tx": bytes([0]) + ring([(PAYLOAD, 12, NEXT, 1), (PAYLOAD + 40, 5, 0, 0)]) + b"hello, world" * 4,
        "rx": bytes([1, 9]) + b"typed text" + ring([(PAYLOAD, 4, WRITE | NEXT, 1), (PAYLOAD + 40, 16, WRITE, 0)]),
        "rx_empty_buf": bytes([1, 3]) + b"abc" + ring([(PAYLOAD, 0, WRITE, 0)]),
        "tx_writable": bytes([0]) + ring([(PAYLOAD, 4, WRITE, 0)]),
    }
    s["pci"] = {
        # single/per-queue, then ops (see fuzz_pci): BAR writes by conf1, MMIO
        "bar_overlap": bytes([0]) + bytes([0xC7, 1, 0x10, 0xE0, 0, 0] + [0xC7, 1, 0x10, 0x01, 0xE0, 0] * 2) * 3,
        "mmio": bytes([0]) + bytes([0x84, 0, 0x14, 0, 1, 0x80, 1, 0x14, 0]) * 6,
        "single": bytes([1]) + bytes([0xC3, 2, 0x10, 0xC4, 0, 0x00, 0x08, 2, 0]) * 4,
        "msix": bytes([2]) + msix_program(),
        "msix_config": bytes([2]) + msix_config_program(),
        "config_intx": bytes([0]) + bytes([0x38, 0, 0, 0, 0x3A, 0, 0, 0]) * 2,
    }
    import gzip
    from test_loader import bzimage_with_payload, kernel_payload, make_bzimage, make_elf
    elf = make_elf(64, entry=0x100000)
    s["loader"] = {
        "elf64": bytes([0]) + elf,
        "elf32": bytes([0]) + make_elf(32),
        "elf_initrd": bytes([1]) + struct.pack("<H", len(elf)) + elf + b"initrd" * 100,
        "bzimage": bytes([0]) + make_bzimage(),
        "bz_gzip": bytes([0]) + bzimage_with_payload(kernel_payload("gzip", elf)),
        "bz_xz": bytes([0]) + bzimage_with_payload(kernel_payload("xz", elf)),
        "bz_lz4": bytes([0]) + bzimage_with_payload(kernel_payload("lz4", elf)),
        "gzip": bytes([2]) + struct.pack("<I", 1 << 16) + gzip.compress(b"x" * 1000) + struct.pack("<I", 1000),
        "lz4": bytes([2]) + struct.pack("<I", 1 << 16) + kernel_payload("lz4", b"abc" * 300),
        "garbage": bytes([0]) + b"\x7fELF" + bytes(60),
    }
    s["decode"] = {
        "mov_store": bytes([0, 6]) + bytes.fromhex("8905 00100000") + bytes(9),
        "mov_load64": bytes([1, 7]) + bytes.fromhex("488b0500100000") + bytes(8),
        "rex_high": bytes([1, 3]) + bytes.fromhex("408a20") + bytes(12),
        "out_dx": bytes([0, 2]) + bytes.fromhex("66ef") + bytes(13),
        "in_imm": bytes([0, 2]) + bytes.fromhex("e4f4") + bytes(13),
        "cli": bytes([0, 1]) + bytes.fromhex("fa") + bytes(14),
        "prefixes": bytes([1, 0]) + bytes.fromhex("2e6766f3488905") + bytes(8),
    }
    import json

    from fuzz.fuzz_warm import BASE, IDENTITY
    valid = json.dumps(BASE).encode() + b"\n"
    s["warm"] = {
        # 0/1: raw bytes / a request built from fuzz_warm.BASE and mutated
        "valid": bytes([0]) + valid,
        "structured": bytes([1, 2, 3, 1, 9]),
        "deep": bytes([0]) + b"[" * 5000 + b"\n",
        "deep_in_string": bytes([0]) + json.dumps({**BASE, "argv": ["[" * 100]}).encode() + b"\n",
        "bad_env": bytes([0]) + json.dumps({**BASE, "env": {"A=B": "c"}}).encode() + b"\n",
        "nan_start": bytes([0]) + json.dumps({**BASE, "started": float("nan")}).encode() + b"\n",
        "surrogate": bytes([0]) + json.dumps({**BASE, "argv": ["\ud800"]}).encode() + b"\n",
        "other_ns": bytes([0]) + json.dumps({**BASE, "context": {**IDENTITY["context"], "namespaces": {}}}).encode()
        + b"\n",
        "not_utf8": bytes([0]) + b'{"argv": ["\xff"]}\n',
    }
    s["snapshot"] = snapshot_seeds()
    return s


def snapshot_seeds():
    """State bodies for fuzz_snapshot: a whole one, and the same with one
    part changed each way the restore path refuses."""
    import json

    from .fuzz_snapshot import seed_body
    whole = seed_body()
    body = json.loads(whole)

    def variant(change):
        b = json.loads(whole)
        change(b)
        return json.dumps(b, sort_keys=True).encode()
    out = {"whole": whole, "list": b"[]", "nested": b"[" * 64 + b"]" * 64}
    out["queue_size"] = variant(lambda b: b["machine"]["knobs"].update(queue_size=3))
    out["mem_window"] = variant(lambda b: b["machine"].update(mem_bytes=3600 << 20))
    out["uart"] = variant(lambda b: b["uart"].update(ier=0x10))
    def enabled_queue(b):
        from lguest_jit import ringstate, vring
        q = vring.new_queue()
        vring.setup_queue(q, 16 << 20, 8, 64, 0x1000, 0x2000, 0x3000, 0)
        rng_queue = b["bus"]["devices"][1]["queues"][0]
        rng_queue["registers"].update(enable=1, size=8)
        rng_queue["ring"] = ringstate.queue_state(q)
    out["ring"] = variant(enabled_queue)
    out["block"] = variant(lambda b: b["machine"]["devices"].append(
        {"kind": "block", "options": {"path": "/dev/null", "readonly": False}}))
    return out


def write_all():
    for target, inputs in seeds().items():
        d = os.path.join(HERE, "corpus", target)
        os.makedirs(d, exist_ok=True)
        for name, data in inputs.items():
            with open(os.path.join(d, f"seed-{name}"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    write_all()
