"""virtio-blk and virtio-rng brought up by Linux's driver sequence over the
PCI bus, moving real data (no hypervisor)."""
import contextlib
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from lguest_jit import pci, vring
from lguest_jit.devices import Block, Rng
from lguest_jit.devices import block as blk
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver

DISK = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, DISK, dtype=np.uint8).tobytes())
    return path


def bring_up(machine, dev, slot_bytes=1 << 16, **kw):
    gm, bus = machine
    return VirtioPciDriver.attach(bus, gm, dev, slot_bytes=slot_bytes, **kw)


def request(drv, rtype, sector=0, out=(), in_lens=(), indirect=False):
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    drv.queues[0].add(out=[hdr, *out], in_=[*in_lens, 1], indirect=indirect)
    drv.kick(0)
    head, length, data = drv.wait_used(0)
    return data[-1][0], length, data[:-1]


def test_config_and_features(machine, disk):
    drv = bring_up(machine, Block(str(disk)))
    assert drv.device_id == 0x1040 + 2
    assert drv.config_read(blk.CFG_CAPACITY, 4) | drv.config_read(blk.CFG_CAPACITY + 4, 4) << 32 == DISK // 512
    assert drv.config_read(blk.CFG_SEG_MAX, 4) == blk.QUEUE_SIZE - 2
    for bit in (blk.VIRTIO_BLK_F_FLUSH, blk.VIRTIO_BLK_F_SEG_MAX, blk.VIRTIO_BLK_F_DISCARD,
                blk.VIRTIO_BLK_F_WRITE_ZEROES, vring.VIRTIO_RING_F_INDIRECT_DESC):
        assert drv.features >> bit & 1
    assert not drv.features >> blk.VIRTIO_BLK_F_RO & 1


@pytest.mark.parametrize("indirect", [False, True])
def test_read_and_write_byte_for_byte(machine, disk, indirect):
    drv = bring_up(machine, Block(str(disk)))
    ref = bytearray(disk.read_bytes())
    status, length, data = request(drv, blk.T_IN, 8, in_lens=[4096], indirect=indirect)
    assert status == blk.BLK_S_OK and length == 4097 and data[0] == ref[4096:8192]
    payload = os.urandom(8192)
    status, length, _ = request(drv, blk.T_OUT, 100, out=[payload], indirect=indirect)
    assert status == blk.BLK_S_OK and length == 1
    ref[100 * 512:100 * 512 + 8192] = payload
    assert disk.read_bytes() == ref


def test_requests_split_over_many_segments(machine, disk):
    drv = bring_up(machine, Block(str(disk)))
    ref = bytearray(disk.read_bytes())
    pieces = [os.urandom(n) for n in (1, 511, 512, 7, 1000, 3) * 20]   # 120 segments, odd sizes
    total = sum(map(len, pieces))
    pad = (-total) % 512
    pieces.append(b"\0" * pad)
    status, _, _ = request(drv, blk.T_OUT, 3, out=pieces, indirect=True)
    assert status == blk.BLK_S_OK
    blob = b"".join(pieces)
    ref[3 * 512:3 * 512 + len(blob)] = blob
    assert disk.read_bytes() == ref
    lens = [len(p) for p in pieces]
    status, length, data = request(drv, blk.T_IN, 3, in_lens=lens, indirect=True)
    assert status == blk.BLK_S_OK and b"".join(data) == blob and length == len(blob) + 1


def test_out_of_range_write_leaves_file_untouched(machine, disk):
    drv = bring_up(machine, Block(str(disk)))
    before = disk.read_bytes()
    last = DISK // 512 - 1
    for sector, n in ((last, 1024), (DISK // 512, 512), (2**63 // 512 + 5, 512), (2**64 // 512 - 1, 512)):
        status, length, _ = request(drv, blk.T_OUT, sector % 2**64, out=[b"\xAA" * n])
        assert status == blk.BLK_S_IOERR and length == 1
        status, _, _ = request(drv, blk.T_IN, sector % 2**64, in_lens=[n])
        assert status == blk.BLK_S_IOERR
    assert disk.read_bytes() == before
    assert os.path.getsize(disk) == DISK
    status, _, data = request(drv, blk.T_IN, last, in_lens=[512])     # the last sector itself is fine
    assert status == blk.BLK_S_OK and data[0] == before[-512:]


def test_flush_get_id_unknown(machine, disk):
    drv = bring_up(machine, Block(str(disk)))
    assert request(drv, blk.T_FLUSH)[0] == blk.BLK_S_OK
    status, length, data = request(drv, blk.T_GET_ID, in_lens=[20])
    assert status == blk.BLK_S_OK and data[0].rstrip(b"\0") == b"disk.img" and length == 21
    assert request(drv, 77)[0] == blk.BLK_S_UNSUPP


def test_discard_and_write_zeroes(machine, disk):
    drv = bring_up(machine, Block(str(disk)))
    ref = bytearray(disk.read_bytes())
    seg = struct.pack("<QII", 16, 16, 0)
    assert request(drv, blk.T_DISCARD, out=[seg])[0] == blk.BLK_S_OK
    ref[16 * 512:32 * 512] = bytes(16 * 512)
    seg = struct.pack("<QII", 100, 8, 0) + struct.pack("<QII", 200, 3, blk.WRITE_ZEROES_UNMAP)
    assert request(drv, blk.T_WRITE_ZEROES, out=[seg])[0] == blk.BLK_S_OK
    ref[100 * 512:108 * 512] = bytes(8 * 512)
    ref[200 * 512:203 * 512] = bytes(3 * 512)
    assert disk.read_bytes() == ref
    # A table with one bad segment changes nothing at all.
    bad = struct.pack("<QII", 300, 8, 0) + struct.pack("<QII", DISK // 512 - 1, 8, 0)
    assert request(drv, blk.T_WRITE_ZEROES, out=[bad])[0] == blk.BLK_S_IOERR
    assert request(drv, blk.T_DISCARD, out=[struct.pack("<QII", 0, 1, 1)])[0] == blk.BLK_S_UNSUPP  # unmap flag
    assert disk.read_bytes() == ref


NOBODY = 65534


@contextlib.contextmanager
def unprivileged(uid: int = NOBODY):
    """The body runs with effective uid and gid ``uid`` (the suite runs as
    root, and root may write a 0444 file): what a launcher started by an
    ordinary user would meet.  Only the effective ids change, and back."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_dir():
    """A directory any uid may enter (tmp_path's parents are root's 0700)."""
    d = Path(tempfile.mkdtemp(prefix="lgj-ro-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("how", ["flag", "file-mode"])
def test_read_only(machine, disk, shared_dir, how):
    if how == "file-mode":
        # A disk its user may read but not write: opened read-only, offered with VIRTIO_BLK_F_RO.
        disk = Path(shutil.copy(disk, shared_dir / "disk.img"))
        disk.chmod(0o444)
        with unprivileged():
            assert not os.access(disk, os.W_OK, effective_ids=True) and os.access(disk, os.R_OK, effective_ids=True)
            dev = Block(str(disk))
        assert os.geteuid() == os.getuid()                    # privileges back
    else:
        dev = Block(str(disk), readonly=True)
    assert dev.readonly
    drv = bring_up(machine, dev)
    before = disk.read_bytes()
    assert drv.features >> blk.VIRTIO_BLK_F_RO & 1
    assert request(drv, blk.T_OUT, 0, out=[b"x" * 512])[0] == blk.BLK_S_IOERR
    assert request(drv, blk.T_WRITE_ZEROES, out=[struct.pack("<QII", 0, 1, 0)])[0] == blk.BLK_S_IOERR
    assert request(drv, blk.T_IN, 0, in_lens=[512])[2][0] == before[:512]
    assert disk.read_bytes() == before


def test_request_without_status_byte_needs_reset(machine, disk):
    gm, bus = machine
    drv = bring_up(machine, Block(str(disk)))
    drv.queues[0].add(out=[struct.pack("<IIQ", blk.T_IN, 0, 0)])     # no writable byte at all
    drv.kick(0)
    assert drv.wait_status(pci.DEVICE_NEEDS_RESET)


def test_reset_with_requests_in_flight_loses_no_completed_write(machine, disk):
    gm, bus = machine
    dev = Block(str(disk))
    drv = bring_up(machine, dev, slot_bytes=8192)
    q = drv.queues[0]
    writes = {}
    for k in range(100):
        data = os.urandom(4096)
        head = q.add(out=[struct.pack("<IIQ", blk.T_OUT, 0, 8 * k), data], in_=[1])
        writes[head] = (k, data)
        if k % 10 == 0:
            drv.kick(0)
        if q.num_free < 3:
            break
    drv.kick(0)
    drv.reset()                               # device_status = 0 with requests in flight
    assert not dev.running, "queue threads joined"
    done = []
    while (got := q.get_used()) is not None:
        done.append(got[0])
    content = disk.read_bytes()
    for head in done:
        k, data = writes[head]
        assert content[k * 4096:(k + 1) * 4096] == data
    assert threading.active_count() < 50
    # And the device comes back after the reset.
    drv.init()
    assert request(drv, blk.T_IN, 0, in_lens=[512])[0] == blk.BLK_S_OK


def test_rng_returns_bytes(machine):
    drv = bring_up(machine, Rng(bytes_per_request=1000))
    q = drv.queues[0]
    q.add(in_=[64])
    drv.kick(0)
    _, length, data = drv.wait_used(0)
    assert length == 64 and len(data[0]) == 64 and data[0] != bytes(64)
    q.add(in_=[800, 800])                      # capped at 1000 bytes per request
    drv.kick(0)
    _, length, data = drv.wait_used(0)
    assert length == 1000 and data[1][200:] == bytes(600)


def test_rng_rejects_readable_buffers(machine):
    drv = bring_up(machine, Rng())
    drv.queues[0].add(out=[b"x"], in_=[8])
    drv.kick(0)
    assert drv.wait_status(pci.DEVICE_NEEDS_RESET)


def test_threads_stop_on_bus_close(disk):
    gm = GuestMemory(32 << 20)
    bus = pci.Bus(gm)
    before = threading.active_count()
    devs = [Block(str(disk)), Rng()]
    for d in devs:
        t = bus.add_device(d)
        VirtioPciDriver(bus, t.slot, gm, slot_bytes=4096).init()
    assert threading.active_count() == before + 2
    bus.close()
    assert threading.active_count() == before
    assert not any(d.running for d in devs)
    gm.close()
