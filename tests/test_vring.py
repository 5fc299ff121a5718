"""The virtqueue engine (split and packed rings) against a Linux-style driver and against
malformed rings: one test per rule, each breaking exactly that rule."""
import os
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lguest_jit import vring
from lguest_jit.hw.fields import FieldError
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import MockDriver
from naive import packed_wants_interrupt, vring_need_event, walk_chain, walk_packed

IND = 1 << vring.VIRTIO_RING_F_INDIRECT_DESC
EVT = 1 << vring.VIRTIO_RING_F_EVENT_IDX
NEXT, WRITE, INDIRECT = vring.VRING_DESC_F_NEXT, vring.VRING_DESC_F_WRITE, vring.VRING_DESC_F_INDIRECT


def setup(gm, size=8, features=IND):
    drv = MockDriver(gm, size=size, features=features)
    return drv, drv.device_queue(), vring.new_iov(size)


def expect_error(gm, q, iov, code):
    before = q.copy()
    r = vring.pop(gm.mem, q, iov)
    assert r == -code, (r, vring.error_message(r))
    assert q[vring.Q_ERROR] == code
    # Nothing consumed: the device can be reset and the driver can retry.
    assert q[vring.Q_LAST_AVAIL] == before[vring.Q_LAST_AVAIL]
    assert str(vring.error_message(r)).count("§") >= 1 or code == vring.E_IOV_SHORT


# ---------------------------------------------------------------- valid chains

def test_direct_chain_pops_in_order(gm):
    drv, q, iov = setup(gm)
    head = drv.add(out=[b"abc", b"defg"], in_=[16])
    assert vring.pop(gm.mem, q, iov) == head
    ch = vring.chain(iov, q)
    assert [(ln, w) for _, ln, w in ch] == [(3, False), (4, False), (16, True)]
    assert q[vring.Q_OUT] == 2 and q[vring.Q_IN] == 1
    assert q[vring.Q_OUT_BYTES] == 7 and q[vring.Q_IN_BYTES] == 16
    assert gm.read(ch[1][0], 4) == b"defg"
    assert vring.pop(gm.mem, q, iov) == vring.NO_BUFFER


def test_indirect_chain(gm):
    drv, q, iov = setup(gm)
    head = drv.add(out=[b"hdr", b"payload"], in_=[1], indirect=True)
    assert drv.inflight[head][2], "driver should have used an indirect table"
    assert vring.pop(gm.mem, q, iov) == head
    assert [(ln, w) for _, ln, w in vring.chain(iov, q)] == [(3, False), (7, False), (1, True)]


def test_direct_then_indirect_in_one_chain(gm):
    # §2.4.5.3.2: normal descriptors followed by one indirect descriptor.
    drv, q, iov = setup(gm)
    table = drv.indirect_base
    drv.write_desc(0, 0x200000, 10, NEXT, 1, table=table)
    drv.write_desc(1, 0x200100, 20, WRITE, 0, table=table)
    drv.write_desc(0, 0x300000, 5, NEXT, 1)
    drv.write_desc(1, table, 32, INDIRECT, 0)
    drv.post(0)
    assert vring.pop(gm.mem, q, iov) == 0
    assert [(ln, w) for _, ln, w in vring.chain(iov, q)] == [(5, False), (10, False), (20, True)]


def test_indirect_write_flag_on_pointer_is_ignored(gm):
    drv, q, iov = setup(gm)
    table = drv.indirect_base
    drv.write_desc(0, 0x200000, 10, 0, 0, table=table)
    drv.write_desc(0, table, 16, INDIRECT | WRITE, 0)
    drv.post(0)
    assert vring.pop(gm.mem, q, iov) == 0
    assert vring.chain(iov, q) == [(0x200000, 10, False)]


def test_buffer_ending_exactly_at_end_of_ram_is_valid(gm):
    drv, q, iov = setup(gm)
    drv.add(out=[(gm.size - 16, 16)])
    assert vring.pop(gm.mem, q, iov) == 0


def test_avail_index_wraps(gm):
    drv, q, iov = setup(gm, size=4)
    q[vring.Q_LAST_AVAIL] = 0xFFFE
    drv.avail_shadow = 0xFFFE
    heads = [drv.add(out=[b"x"]) for _ in range(4)]
    got = [vring.pop(gm.mem, q, iov) for _ in range(4)]
    assert got == heads
    assert q[vring.Q_LAST_AVAIL] == 2
    assert vring.pop(gm.mem, q, iov) == vring.NO_BUFFER


# ---------------------------------------------------------------- one test per rule

def test_avail_idx_moved_more_than_queue_size(gm):
    drv, q, iov = setup(gm)
    drv.add(out=[b"x"])
    drv.set_avail_idx(9)            # 9 > size 8
    expect_error(gm, q, iov, vring.E_AVAIL_IDX)


def test_head_out_of_range(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, 0x200000, 1, 0, 0)
    drv.post(8)
    expect_error(gm, q, iov, vring.E_HEAD_RANGE)


def test_next_out_of_range(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, 0x200000, 1, NEXT, 8)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_NEXT_RANGE)


def post_indirect(drv, entries):
    """Head 0 points at an indirect table holding ``entries`` (flags, next),
    each a 1-byte buffer."""
    table = drv.indirect_base
    for i, (flags, nxt) in enumerate(entries):
        drv.write_desc(i, 0x200000, 1, flags, nxt, table=table)
    drv.write_desc(0, table, 16 * len(entries), INDIRECT, 0)
    drv.post(0)


def test_next_out_of_range_of_indirect_table(gm):
    drv, q, iov = setup(gm)
    post_indirect(drv, [(NEXT, 2), (0, 0)])                # table has 2 entries
    expect_error(gm, q, iov, vring.E_NEXT_RANGE)


def test_looped_chain(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, 0x200000, 1, NEXT, 1)
    drv.write_desc(1, 0x200000, 1, NEXT, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_CHAIN_LOOP)


def test_looped_indirect_table(gm):
    drv, q, iov = setup(gm)
    post_indirect(drv, [(NEXT, 1), (NEXT, 0)])
    expect_error(gm, q, iov, vring.E_CHAIN_LOOP)


def test_out_after_in(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, 0x200000, 1, NEXT | WRITE, 1)
    drv.write_desc(1, 0x200000, 1, 0, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_OUT_AFTER_IN)


@pytest.mark.parametrize("addr,length", [
    (4 << 20, 1),                 # starts at end of RAM
    ((4 << 20) - 8, 9),           # ends one byte past RAM
    (2**64 - 8, 16),              # wraps around 2^64
    (2**63, 1),                   # negative as int64
    (0, 0xFFFFFFFF),              # huge length
])
def test_buffer_outside_ram(gm, addr, length):
    drv, q, iov = setup(gm)
    drv.write_desc(0, addr, length, 0, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_BUF_RANGE)


def test_indirect_without_feature(gm):
    drv, q, iov = setup(gm, features=0)
    drv.write_desc(0, drv.indirect_base, 16, INDIRECT, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_FEATURE)


def test_nested_indirect(gm):
    drv, q, iov = setup(gm)
    t1, t2 = drv.indirect_base, drv.indirect_base + 4096
    drv.write_desc(0, 0x200000, 1, 0, 0, table=t2)
    drv.write_desc(0, t2, 16, INDIRECT, 0, table=t1)
    drv.write_desc(0, t1, 16, INDIRECT, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_NESTED)


def test_indirect_with_next(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, 0x200000, 1, 0, 0, table=drv.indirect_base)
    drv.write_desc(0, drv.indirect_base, 16, INDIRECT | NEXT, 1)
    drv.write_desc(1, 0x200000, 1, 0, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_NEXT)


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_length_not_multiple_of_16(gm, length):
    drv, q, iov = setup(gm)
    drv.write_desc(0, drv.indirect_base, length, INDIRECT, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_LEN)


def test_indirect_table_larger_than_queue(gm):
    drv, q, iov = setup(gm)
    drv.write_desc(0, drv.indirect_base, 16 * 9, INDIRECT, 0)   # 9 > size 8
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_SIZE)


@pytest.mark.parametrize("addr", [(4 << 20) - 16, 2**64 - 16])
def test_indirect_table_outside_ram(gm, addr):
    drv, q, iov = setup(gm)
    drv.write_desc(0, addr, 32, INDIRECT, 0)
    drv.post(0)
    expect_error(gm, q, iov, vring.E_INDIRECT_RANGE)


def test_chain_longer_than_queue_through_indirect(gm):
    drv, q, iov = setup(gm, size=4)
    table = drv.indirect_base
    for k in range(4):
        drv.write_desc(k, 0x200000, 1, NEXT if k < 3 else 0, k + 1 if k < 3 else 0, table=table)
    drv.write_desc(0, 0x200000, 1, NEXT, 1)
    drv.write_desc(1, table, 64, INDIRECT, 0)    # 1 direct + 4 indirect = 5 > 4
    drv.post(0)
    expect_error(gm, q, iov, vring.E_CHAIN_LONG)


def test_iov_shorter_than_queue_is_refused(gm):
    drv, q, _ = setup(gm)
    drv.add(out=[b"x"])
    expect_error(gm, q, vring.new_iov(4), vring.E_IOV_SHORT)


# ---------------------------------------------------------------- queue setup (enable time)

@pytest.mark.parametrize("size,max_size", [(0, 256), (3, 256), (512, 256), (65536, 65536)])
def test_queue_size_rule(size, max_size):
    assert vring.check_queue_layout(1 << 24, size, max_size, 0x1000, 0x2000, 0x3000) == vring.E_QUEUE_SIZE


@pytest.mark.parametrize("desc,avail,used,code", [
    (0x1008, 0x2000, 0x3000, vring.E_DESC_ALIGN),
    (0x1000, 0x2001, 0x3000, vring.E_AVAIL_ALIGN),
    (0x1000, 0x2000, 0x3002, vring.E_USED_ALIGN),
    ((1 << 24) - 16 * 255, 0x2000, 0x3000, vring.E_DESC_RANGE),
    (0x1000, (1 << 24) - 2, 0x3000, vring.E_AVAIL_RANGE),
    (0x1000, 0x2000, (1 << 24) - 8, vring.E_USED_RANGE),
    (2**64 - 4096, 0x2000, 0x3000, vring.E_DESC_RANGE),
    (0x1000, 0x2000, 2**63, vring.E_USED_RANGE),
])
def test_queue_layout_rules(desc, avail, used, code):
    assert vring.check_queue_layout(1 << 24, 256, 256, desc, avail, used) == code
    assert "§2.4" in vring.error_message(code)


def test_queue_layout_valid_at_end_of_ram():
    size = 1 << 24
    assert vring.check_queue_layout(size, 256, 256, size - 4096, size - 8192, size - (8 + 8 * 256)) == vring.OK


# ---------------------------------------------------------------- used ring, interrupts, notifications

def test_push_is_invisible_until_publish(gm):
    drv, q, iov = setup(gm)
    head = drv.add(out=[b"x"], in_=[4])
    assert vring.pop(gm.mem, q, iov) == head
    vring.push(gm.mem, q, head, 4)
    assert drv.get_used() is None
    vring.publish(gm.mem, q)
    got = drv.get_used()
    assert got[0] == head and got[1] == 4


def test_batched_publish(gm):
    drv, q, iov = setup(gm)
    heads = [drv.add(in_=[8]) for _ in range(5)]
    for _ in range(5):
        h = vring.pop(gm.mem, q, iov)
        vring.push(gm.mem, q, h, 8)
    vring.publish(gm.mem, q)
    assert [drv.get_used()[0] for _ in range(5)] == heads
    assert vring.need_interrupt(gm.mem, q)
    assert not vring.need_interrupt(gm.mem, q), "nothing new used since the last decision"


def test_no_interrupt_flag(gm):
    drv, q, iov = setup(gm, features=0)
    drv.disable_cb()
    h = drv.add(in_=[1])
    vring.pop(gm.mem, q, iov)
    vring.push(gm.mem, q, h, 1)
    vring.publish(gm.mem, q)
    assert not vring.need_interrupt(gm.mem, q)
    assert q[vring.Q_N_IRQ_SUPPRESSED] == 1
    drv.enable_cb()
    h = drv.get_used()[0]
    h = drv.add(in_=[1])
    vring.pop(gm.mem, q, iov)
    vring.push(gm.mem, q, h, 1)
    vring.publish(gm.mem, q)
    assert vring.need_interrupt(gm.mem, q)


def test_event_idx_used_event(gm):
    drv, q, iov = setup(gm, features=EVT)
    for _ in range(4):
        drv.add(in_=[1])
    drv.set_used_event(2)          # interrupt once used idx passes 2 (i.e. reaches 3)
    for expect in (False, False, True, False):
        h = vring.pop(gm.mem, q, iov)
        vring.push(gm.mem, q, h, 1)
        vring.publish(gm.mem, q)
        assert vring.need_interrupt(gm.mem, q) is expect


@pytest.mark.parametrize("event,new,old", [
    (0xFFFF, 0, 0xFFFE), (0xFFFE, 1, 0xFFFC), (5, 6, 5), (5, 5, 4), (10, 3, 2), (0, 0, 0), (65535, 65535, 0), (3, 2, 65530),
])
def test_need_event_matches_linux(event, new, old):
    assert vring.need_event(event, new, old) == vring_need_event(event, new, old)


@settings(deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))
def test_need_event_property(event, new, old):
    assert vring.need_event(event, new, old) == vring_need_event(event, new, old)


def test_event_idx_interrupt_wraps(gm):
    drv, q, iov = setup(gm, features=EVT, size=4)
    q[vring.Q_USED_IDX] = q[vring.Q_SIGNALLED] = 0xFFFF
    q[vring.Q_LAST_AVAIL] = drv.avail_shadow = drv.last_used = 0xFFFF
    drv.set_used_event(0xFFFF)     # wants an interrupt when used idx goes 0xFFFF -> 0
    h = drv.add(in_=[1])
    assert vring.pop(gm.mem, q, iov) == h
    vring.push(gm.mem, q, h, 1)
    vring.publish(gm.mem, q)
    assert drv.used_idx() == 0
    assert vring.need_interrupt(gm.mem, q)


def test_no_notify_flag_and_recheck(gm):
    drv, q, iov = setup(gm, features=0)
    vring.disable_notify(gm.mem, q)
    drv.add(out=[b"x"])
    assert not drv.kick_prepare(), "device said NO_NOTIFY"
    assert vring.pop(gm.mem, q, iov) >= 0
    assert vring.enable_notify(gm.mem, q) is False, "nothing new: safe to sleep"
    drv.add(out=[b"y"])
    assert drv.kick_prepare()
    # A buffer that slips in between enabling and sleeping is seen.
    vring.disable_notify(gm.mem, q)
    assert vring.enable_notify(gm.mem, q) is True


def test_event_idx_avail_event(gm):
    drv, q, iov = setup(gm, features=EVT)
    drv.add(out=[b"x"])
    vring.pop(gm.mem, q, iov)
    assert vring.enable_notify(gm.mem, q) is False
    assert drv._ld16(drv.used + 4 + 8 * drv.size) == 1     # avail_event = last_avail
    drv.add(out=[b"y"])
    assert drv.kick_prepare(), "avail idx passed avail_event"
    drv.add(out=[b"z"])
    assert not drv.kick_prepare(), "device has not caught up: no second kick"


# ---------------------------------------------------------------- iovec helpers

def test_iov_copy_consume_and_status_byte(gm):
    drv, q, iov = setup(gm)
    drv.add(out=[b"0123", b"456789"], in_=[3, 5])
    vring.pop(gm.mem, q, iov)
    buf = np.zeros(16, np.uint8)
    assert vring.iov_to_buf(gm.mem, iov, 0, 2, buf) == 10
    assert buf[:10].tobytes() == b"0123456789"
    assert vring.iov_consume(iov, 0, 2, 6) == 6
    assert vring.iov_to_buf(gm.mem, iov, 0, 2, buf) == 4 and buf[:4].tobytes() == b"6789"
    src = np.frombuffer(b"abcdefgh", np.uint8).copy()
    assert vring.buf_to_iov(gm.mem, iov, 2, 2, src, 8) == 8
    status = vring._last_writable_byte(iov, 2, 2)
    assert status == int(iov[3, 0]) + 4
    vring.push(gm.mem, q, 0, 8)
    vring.publish(gm.mem, q)
    assert drv.get_used()[2] == [b"abc", b"defgh"]


def test_consume_more_than_available_reports_short(gm):
    drv, q, iov = setup(gm)
    drv.add(out=[b"ab", b"c"])
    vring.pop(gm.mem, q, iov)
    assert vring.iov_consume(iov, 0, 2, 10) == 3


def test_iov_advance_resumes_after_short_transfers(gm):
    hiov = np.array([[100, 4], [200, 3], [300, 5]], dtype=np.uint64)
    assert vring.iov_advance(hiov, 0, 3, 2) == 0 and hiov[0].tolist() == [102, 2]      # inside a row
    assert vring.iov_advance(hiov, 0, 3, 2) == 1 and hiov[0].tolist() == [102, 2]      # a row exactly
    assert vring.iov_advance(hiov, 1, 3, 4) == 2 and hiov[2].tolist() == [301, 4]      # across rows
    assert vring.iov_advance(hiov, 2, 3, 4) == 3                                        # all done
    assert vring.iov_advance(hiov, 3, 3, 0) == 3


# ---------------------------------------------------------------- the device side: next_chain and friends

def device_args(gm, q, iov):
    """next_chain's fd arguments with nothing to wait on: chains are posted first."""
    notify, irq = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    return (gm.mem, q, iov, notify, np.zeros(1, np.uint8), irq, np.zeros(1, np.uint64)), (notify, irq)


@pytest.mark.parametrize("shape, header, out, in_, code", [
    (vring.CHAIN_WRITABLE, 0, [b"x"], [8], vring.E_CHAIN_READABLE),       # rng, console/net receive
    (vring.CHAIN_WRITABLE, 12, [], [8], vring.E_SHORT_HEADER),            # net receive header
    (vring.CHAIN_READABLE, 0, [b"x"], [8], vring.E_CHAIN_WRITABLE),       # console/net transmit
    (vring.CHAIN_READABLE, 12, [b"x" * 11], [], vring.E_SHORT_HEADER),    # net transmit header
    (vring.CHAIN_REQUEST, 16, [b"h" * 16], [], vring.E_NO_STATUS),        # block: no writable part
    (vring.CHAIN_REQUEST, 16, [b"h" * 16], [8, 0], vring.E_NO_STATUS),    # block: last buffer empty
    (vring.CHAIN_REQUEST, 16, [b"h" * 15], [1], vring.E_SHORT_HEADER),    # block: short header
])
def test_next_chain_refuses_each_shape_rule_with_its_code(gm, shape, header, out, in_, code):
    drv, q, iov = setup(gm)
    drv.add(out=out, in_=in_)
    args, fds = device_args(gm, q, iov)
    try:
        assert vring.next_chain(*args, shape, header) == -code
        assert q[vring.Q_ERROR] == code and q[vring.Q_N_ERRORS] == 1
        assert "§" in vring.error_message(code)
        # The same chain is fine for a device that asks for no shape.
        drv.add(out=out, in_=in_)
        assert vring.next_chain(*args, vring.CHAIN_ANY, 0) >= 0
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("shape, header, out, in_", [
    (vring.CHAIN_WRITABLE, 12, [], [8, 4]),
    (vring.CHAIN_READABLE, 12, [b"x" * 6, b"y" * 6], []),
    (vring.CHAIN_REQUEST, 16, [b"h" * 8, b"h" * 8, b"data"], [512, 1]),
])
def test_next_chain_accepts_each_shape(gm, shape, header, out, in_):
    drv, q, iov = setup(gm)
    head = drv.add(out=out, in_=in_)
    args, fds = device_args(gm, q, iov)
    try:
        assert vring.next_chain(*args, shape, header) == head
        assert q[vring.Q_N_ERRORS] == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_complete_unpop_and_finish(gm):
    drv, q, iov = setup(gm, features=0)
    args, (notify, irq) = device_args(gm, q, iov)
    try:
        first = drv.add(in_=[8])
        second = drv.add(in_=[8])
        assert vring.next_chain(*args, vring.CHAIN_WRITABLE, 0) == first
        vring.complete(gm.mem, q, first, 5, 7)
        assert drv.used_idx() == 1 and q[vring.Q_N_BYTES] == 7           # published at once
        assert vring.next_chain(*args, vring.CHAIN_WRITABLE, 0) == second
        vring.unpop(q)                                                  # handed back unused
        assert q[vring.Q_N_CHAINS] == 1
        assert vring.next_chain(*args, vring.CHAIN_WRITABLE, 0) == second
        vring.unpop(q)
        q[vring.Q_STOP] = 1
        assert vring.next_chain(*args, vring.CHAIN_WRITABLE, 0) == vring.STOPPED
        mem, q_, iov_, notify_, isr, irq_, scratch = args
        assert vring.finish(mem, q, isr, irq, scratch, vring.STOPPED) == vring.STOPPED
        assert isr[0] == 1 and os.eventfd_read(irq) == 1                 # the driver heard of `first`
        assert drv.get_used()[:2] == (first, 5) and drv.get_used() is None
    finally:
        os.close(notify)
        os.close(irq)


# ---------------------------------------------------------------- the blocking service path

def test_wait_chain_sleeps_wakes_and_stops(gm):
    drv, q, iov = setup(gm, features=0)
    notify, irq = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    isr = np.zeros(1, np.uint8)
    scratch = np.zeros(1, np.uint64)
    results = []

    def service():
        while True:
            h = vring.next_chain(gm.mem, q, iov, notify, isr, irq, scratch, vring.CHAIN_ANY, 0)
            if h < 0:
                results.append(h)
                return
            results.append(h)
            vring.complete(gm.mem, q, h, 0, 0)

    t = threading.Thread(target=service)
    t.start()
    try:
        h = drv.add(out=[b"ping"])
        if drv.kick_prepare():
            os.eventfd_write(notify, 1)
        deadline = 3000    # 30 s: the first run may compile the kernels
        while drv.used_idx() == 0 and deadline:
            threading.Event().wait(0.01)
            deadline -= 1
        assert drv.get_used()[0] == h
        assert isr[0] == 1, "ISR bit set before the interrupt"
        assert os.eventfd_read(irq) >= 1
    finally:
        q[vring.Q_STOP] = 1
        os.eventfd_write(notify, 1)
        t.join(10)
    assert not t.is_alive()
    assert results == [h, vring.STOPPED]
    os.close(notify)
    os.close(irq)


# ---------------------------------------------------------------- property test

MEM = 1 << 16           # small RAM: rings sit right against the guard page


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    indirect_ok = draw(st.booleans())
    # Half the rings are well-formed-looking (so valid chains are common and
    # the walkers get compared); the rest are hostile.
    sane = draw(st.booleans())
    if sane:
        addr = st.integers(0, MEM - 4096)
        length = st.integers(0, 64)
        flags = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, NEXT, NEXT | WRITE, INDIRECT])
        nxt = st.integers(0, size - 1)
    else:
        addr = st.one_of(st.integers(0, MEM - 1), st.integers(MEM - 64, MEM + 64),
                         st.integers(2**64 - 64, 2**64 - 1), st.integers(0, 2**64 - 1))
        length = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 16 * size, 16 * size + 16]),
                           st.integers(0, 2**32 - 1))
        flags = st.integers(0, 7)
        nxt = st.one_of(st.integers(0, size), st.integers(0, 65535))
    table = [(draw(addr), draw(length), draw(flags), draw(nxt)) for _ in range(size)]
    # A second table the indirect descriptors can point at.
    ind = [(draw(addr), draw(length), draw(flags), draw(nxt)) for _ in range(draw(st.integers(1, 8)))]
    last_avail = draw(st.integers(0, 65535))
    idx = (last_avail + 1) & 0xFFFF if sane else draw(st.one_of(st.just((last_avail + 1) & 0xFFFF),
                                                                  st.integers(0, 65535)))
    head = st.integers(0, size - 1) if sane else st.one_of(st.integers(0, size - 1), st.integers(0, 65535))
    heads = [draw(head) for _ in range(size)]
    point_ind = draw(st.booleans())
    return size, indirect_ok, table, ind, last_avail, idx, heads, point_ind


@settings(max_examples=int(os.environ.get("VRING_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rings())
def test_property_matches_reference_and_stays_inside(r):
    size, indirect_ok, table, ind, last_avail, idx, heads, point_ind = r
    gm = GuestMemory(MEM)
    try:
        mem = gm.mem
        # Layout against the top of RAM: used ring, avail ring, desc table, indirect table.
        desc = MEM - 16 * size
        ind_at = (desc - 16 * len(ind)) & ~15
        avail = (ind_at - (6 + 2 * size)) & ~1
        used = (avail - (6 + 8 * size)) & ~3
        for k, (a, ln, fl, nx) in enumerate(ind):
            struct.pack_into("<QIHH", mem, ind_at + 16 * k, a, ln, fl, nx)
        for k, (a, ln, fl, nx) in enumerate(table):
            if point_ind and k == 0:
                a, ln = ind_at, 16 * len(ind)
            struct.pack_into("<QIHH", mem, desc + 16 * k, a, ln, fl, nx)
        struct.pack_into("<HH", mem, avail, 0, idx)
        for k, h in enumerate(heads):
            struct.pack_into("<H", mem, avail + 4 + 2 * k, h)
        q = vring.new_queue()
        feats = IND if indirect_ok else 0
        assert vring.setup_queue(q, MEM, size, size, desc, avail, used, feats) == vring.OK
        q[vring.Q_LAST_AVAIL] = last_avail
        iov = vring.new_iov(size)
        got = vring.pop(mem, q, iov)
        kind, want = walk_chain(mem.tobytes(), MEM, size, desc, avail, last_avail, indirect_ok)
        event(kind if got >= -1 else f"{kind}: {vring.error_message(got).split(' (')[0]}")
        if kind == "empty":
            assert got == vring.NO_BUFFER
        elif kind == "invalid":
            assert got <= -vring.E_AVAIL_IDX and vring.error_message(got)
        else:
            head, bufs = want
            assert got == head
            assert vring.chain(iov, q) == bufs
        for a, n, _ in (vring.chain(iov, q) if got >= 0 else []):
            assert 0 <= a and a + n <= MEM
    finally:
        gm.close()


def test_mock_driver_aligns_large_buffers_only(gm):
    drv = MockDriver(gm, size=8, features=IND, slot_bytes=3 * 4096)
    q, iov = drv.device_queue(), vring.new_iov(8)
    head = drv.add(out=[b"h" * 16], in_=[4096, 1], indirect=True, align=4096)
    slot = drv.data_base + head * drv.slot_bytes
    assert vring.pop(gm.mem, q, iov) == head
    (a0, l0), (a1, l1), (a2, l2) = [(int(iov[k, 0]), int(iov[k, 1])) for k in range(3)]
    assert (a0, l0) == (slot, 16)                     # header packed at the slot's start
    assert a1 % 4096 == 0 and a1 > slot and l1 == 4096  # the page of data on a page boundary
    assert (a2, l2) == (a1 + 4096, 1)                 # the status byte right after it


# ================================================================ packed rings (virtio 1.1 §2.7)

PACKED = 1 << vring.VIRTIO_F_RING_PACKED
AVAIL_F, USED_F = vring.VRING_PACKED_DESC_F_AVAIL, vring.VRING_PACKED_DESC_F_USED


def psetup(gm, size=8, features=IND):
    drv = MockDriver(gm, size=size, features=features | PACKED)
    assert drv.packed
    q = drv.device_queue()
    assert q[vring.Q_LAYOUT] == vring.LAYOUT_PACKED and vring.layout_name(q) == "packed"
    return drv, q, vring.new_iov(size)


def split_head(h):
    return h & 0xFFFF, h >> 16


def test_packed_lists_pop_in_order_and_wrap_the_ring(gm):
    drv, q, iov = psetup(gm, size=5)          # not a power of two: §2.7 allows it
    for _ in range(7):                         # 7 rounds of 3 + 1 slots: the ring wraps several times
        a = drv.add(out=[b"head", b"body"], in_=[3])
        b = drv.add(in_=[9])
        h = vring.pop(gm.mem, q, iov)
        assert split_head(h) == (a, 3)
        assert vring.chain(iov, q) == [(drv.data_base + a * drv.slot_bytes, 4, False),
                                       (drv.data_base + a * drv.slot_bytes + 4, 4, False),
                                       (drv.data_base + a * drv.slot_bytes + 8, 3, True)]
        h2 = vring.pop(gm.mem, q, iov)
        assert split_head(h2) == (b, 1) and q[vring.Q_IN_BYTES] == 9
        assert vring.pop(gm.mem, q, iov) == vring.NO_BUFFER
        vring.push(gm.mem, q, h2, 9)           # out of order: the second list first
        vring.push(gm.mem, q, h, 3)
        assert drv.get_used()[:2] == (b, 9)
        assert drv.get_used()[:2] == (a, 3)
        assert drv.get_used() is None
    assert (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (drv.next_avail, drv.avail_wrap)
    assert (q[vring.Q_USED_IDX], q[vring.Q_USED_WRAP]) == (drv.last_used, drv.used_wrap)
    assert q[vring.Q_N_ERRORS] == 0


def test_packed_indirect_list_and_used_flags(gm):
    drv, q, iov = psetup(gm)
    bid = drv.add(out=[b"a", b"bc"], in_=[4], indirect=True)
    h = vring.pop(gm.mem, q, iov)
    assert split_head(h) == (bid, 1) and q[vring.Q_OUT] == 2 and q[vring.Q_IN] == 1
    vring.push(gm.mem, q, h, 4)
    flags = int.from_bytes(gm.mem[drv.desc + 14:drv.desc + 16].tobytes(), "little")
    assert flags == AVAIL_F | USED_F | WRITE          # used in lap 1; data written (§2.7.3)
    assert drv.get_used()[:2] == (bid, 4)


def test_packed_used_written_once_per_list(gm):
    # §2.7.6: one used descriptor for a list of three; the other two slots keep the driver's flags.
    drv, q, iov = psetup(gm)
    drv.add(out=[b"x", b"y"], in_=[1])
    before = gm.mem[drv.desc + 16:drv.desc + 48].copy()
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 0)
    assert (gm.mem[drv.desc + 16:drv.desc + 48] == before).all()
    assert q[vring.Q_USED_IDX] == 3 and drv.get_used() is not None and drv.last_used == 3
    flags = int.from_bytes(gm.mem[drv.desc + 14:drv.desc + 16].tobytes(), "little")
    assert flags == AVAIL_F | USED_F                  # nothing written: no WRITE bit


def test_packed_unpop_steps_back_across_the_wrap(gm):
    drv, q, iov = psetup(gm, size=4)
    for _ in range(3):
        drv.add(in_=[1])
        vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
        drv.get_used()
    bid = drv.add(in_=[1], out=[b"z"])                 # slots 3 and 0: crosses the ring's end
    h = vring.pop(gm.mem, q, iov)
    assert split_head(h) == (bid, 2) and (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (1, 0)
    vring.unpop(q)
    assert (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (3, 1)
    assert vring.pop(gm.mem, q, iov) == h             # the same list again, its ID not "reused"
    vring.push(gm.mem, q, h, 1)
    assert drv.get_used()[0] == bid


def expect_packed_error(gm, q, iov, code):
    before = q.copy()
    r = vring.pop(gm.mem, q, iov)
    assert r == -code, (r, vring.error_message(r))
    assert q[vring.Q_ERROR] == code
    for f in (vring.Q_LAST_AVAIL, vring.Q_AVAIL_WRAP):
        assert q[f] == before[f]
    assert (q[vring.Q_IDS:] == before[vring.Q_IDS:]).all()
    assert "§2.7" in vring.error_message(r)


def test_packed_rule_later_descriptor_not_available(gm):
    drv, q, iov = psetup(gm)
    # Head available in lap 1, its NEXT descriptor still carrying lap 0's marks.
    drv.write_desc(1, drv.data_base, 4, drv.lap_bits(0), 0)
    drv.write_desc(0, drv.data_base, 4, NEXT | drv.lap_bits(1), 0)
    expect_packed_error(gm, q, iov, vring.E_PACKED_NOT_AVAIL)


def test_packed_rule_wrong_lap_across_the_ring_end(gm):
    drv, q, iov = psetup(gm, size=4)
    for _ in range(3):
        drv.add(in_=[1])
        vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
        drv.get_used()
    # A list at slots 3 and 0 whose second descriptor keeps lap 1's bits
    # (it must carry lap 0's, §2.7.1): the driver forgot to toggle its counter.
    drv.write_desc(0, drv.data_base, 4, drv.lap_bits(1), 7)
    drv.write_desc(3, drv.data_base, 4, NEXT | drv.lap_bits(1), 7)
    expect_packed_error(gm, q, iov, vring.E_PACKED_NOT_AVAIL)
    drv.write_desc(0, drv.data_base, 4, drv.lap_bits(0), 7)   # corrected: it pops
    assert split_head(vring.pop(gm.mem, q, iov)) == (7, 2)


def test_packed_rule_list_as_long_as_the_ring_is_valid_longer_is_not(gm):
    drv, q, iov = psetup(gm, size=4, features=0)
    for i in range(4):
        drv.write_desc(i, drv.data_base + i, 1, (NEXT if i < 3 else 0) | drv.lap_bits(1), 2)
    assert split_head(vring.pop(gm.mem, q, iov)) == (2, 4)
    vring.push(gm.mem, q, (2 | 4 << 16), 0)
    # Every slot says NEXT: the list would run into its own first descriptor.
    for i in range(4):
        drv.write_desc(i, drv.data_base + i, 1, NEXT | drv.lap_bits(0), 3)
    r = vring.pop(gm.mem, q, iov)
    assert r in (-vring.E_PACKED_NOT_AVAIL, -vring.E_CHAIN_LONG)


@pytest.mark.parametrize("flags_of", ["indirect_next", "indirect_second"])
def test_packed_rule_indirect_in_a_linked_list(gm, flags_of):
    drv, q, iov = psetup(gm)
    table = drv.indirect_base
    drv.write_desc(0, drv.data_base, 4, 0, 0, table=table)
    if flags_of == "indirect_next":
        drv.write_desc(1, drv.data_base, 4, drv.lap_bits(), 0)
        drv.write_desc(0, table, 16, INDIRECT | NEXT | drv.lap_bits(), 0)
    else:
        drv.write_desc(1, table, 16, INDIRECT | drv.lap_bits(), 0)
        drv.write_desc(0, drv.data_base, 4, NEXT | drv.lap_bits(), 0)
    expect_packed_error(gm, q, iov, vring.E_PACKED_INDIRECT_CHAIN)


def test_packed_rule_buffer_id_reused_while_held(gm):
    drv, q, iov = psetup(gm)
    drv.write_desc(0, drv.data_base, 4, drv.lap_bits(), 5)
    drv.write_desc(1, drv.data_base, 4, drv.lap_bits(), 5)     # ID 5 again, first one not used yet
    first = vring.pop(gm.mem, q, iov)
    assert split_head(first) == (5, 1)
    expect_packed_error(gm, q, iov, vring.E_PACKED_ID_REUSE)
    vring.push(gm.mem, q, first, 0)                          # given back: now it may come again
    assert split_head(vring.pop(gm.mem, q, iov)) == (5, 1)


@pytest.mark.parametrize("setup_table, code", [
    ("no_feature", vring.E_INDIRECT_FEATURE),
    ("nested", vring.E_INDIRECT_NESTED),
    ("len0", vring.E_INDIRECT_LEN),
    ("len17", vring.E_INDIRECT_LEN),
    ("too_big", vring.E_INDIRECT_SIZE),
    ("outside", vring.E_INDIRECT_RANGE),
    ("entry_outside", vring.E_BUF_RANGE),
    ("out_after_in", vring.E_OUT_AFTER_IN),
])
def test_packed_indirect_rules(gm, setup_table, code):
    drv, q, iov = psetup(gm, features=0 if setup_table == "no_feature" else IND)
    t = drv.indirect_base
    drv.write_desc(0, drv.data_base, 4, WRITE, 0, table=t)
    drv.write_desc(1, drv.data_base, 4, WRITE, 0, table=t)
    length = 32
    if setup_table == "nested":
        drv.write_desc(1, t, 16, INDIRECT, 0, table=t)
    elif setup_table == "len0":
        length = 0
    elif setup_table == "len17":
        length = 17
    elif setup_table == "too_big":
        length = 16 * 9
    elif setup_table == "outside":
        t = gm.size - 16
    elif setup_table == "entry_outside":
        drv.write_desc(1, gm.size - 2, 4, WRITE, 0, table=t)
    elif setup_table == "out_after_in":
        drv.write_desc(1, drv.data_base, 4, 0, 0, table=t)
    drv.write_desc(0, t, length, INDIRECT | drv.lap_bits(), 1)
    expect_packed_error(gm, q, iov, code)


def test_packed_indirect_ignores_reserved_flags_and_ids(gm):
    # §2.7.7: WRITE is the only flag of a table entry; NEXT and IDs are ignored.
    drv, q, iov = psetup(gm)
    t = drv.indirect_base
    drv.write_desc(0, drv.data_base, 4, NEXT, 99, table=t)
    drv.write_desc(1, drv.data_base + 4, 2, WRITE | NEXT, 77, table=t)
    drv.write_desc(0, t, 32, INDIRECT | WRITE | drv.lap_bits(), 6)
    h = vring.pop(gm.mem, q, iov)
    assert split_head(h) == (6, 1)
    assert vring.chain(iov, q) == [(drv.data_base, 4, False), (drv.data_base + 4, 2, True)]


@pytest.mark.parametrize("what, code", [
    ("buf_outside", vring.E_BUF_RANGE),
    ("out_after_in", vring.E_OUT_AFTER_IN),
])
def test_packed_direct_rules(gm, what, code):
    drv, q, iov = psetup(gm)
    if what == "buf_outside":
        drv.write_desc(0, 2**64 - 8, 16, drv.lap_bits(), 0)
    else:
        drv.write_desc(1, drv.data_base, 4, drv.lap_bits(), 0)
        drv.write_desc(0, drv.data_base, 4, WRITE | NEXT | drv.lap_bits(), 0)
    expect_packed_error(gm, q, iov, code)


def test_packed_iov_shorter_than_queue_is_refused(gm):
    drv, q, _ = psetup(gm)
    drv.add(in_=[1])
    r = vring.pop(gm.mem, q, vring.new_iov(4))
    assert r == -vring.E_IOV_SHORT


@pytest.mark.parametrize("size,max_size,ok", [(0, 256, False), (3, 256, True), (5, 4, False), (32768, 32768, True),
                                              (32769, 65536, False), (1, 1, True)])
def test_packed_queue_size_rule(size, max_size, ok):
    r = vring.check_queue_layout(1 << 24, size, max_size, 0x1000, 0x2000, 0x3000, packed=True)
    assert r == (vring.OK if ok else vring.E_PACKED_QUEUE_SIZE)


@pytest.mark.parametrize("desc,drv_ev,dev_ev,code", [
    (0x1008, 0x2000, 0x3000, vring.E_DESC_ALIGN),
    (0x1000, 0x2002, 0x3000, vring.E_EVENT_ALIGN),
    (0x1000, 0x2000, 0x3001, vring.E_EVENT_ALIGN),
    ((1 << 24) - 16, 0x2000, 0x3000, vring.E_DESC_RANGE),
    (0x1000, 1 << 24, 0x3000, vring.E_DRIVER_EVENT_RANGE),
    (0x1000, 0x2000, 2**64 - 4, vring.E_DEVICE_EVENT_RANGE),
    (0x1000, (1 << 24) - 4, (1 << 24) - 4, vring.OK),                 # both end exactly at the top of RAM
])
def test_packed_layout_rules(desc, drv_ev, dev_ev, code):
    assert vring.check_queue_layout(1 << 24, 256, 256, desc, drv_ev, dev_ev, packed=True) == code


# -- event suppression (§2.7.10, §2.7.14)

def decide(gm, q):
    return vring.need_interrupt(gm.mem, q)


def test_packed_driver_event_flags_enable_disable(gm):
    drv, q, iov = psetup(gm, features=0)
    drv.add(in_=[1])
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    assert decide(gm, q) is True                 # ENABLE (the ring starts zeroed)
    assert decide(gm, q) is False                # nothing new since
    drv.disable_cb()
    drv.get_used()
    drv.add(in_=[1])
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    assert decide(gm, q) is False and q[vring.Q_N_IRQ_SUPPRESSED] == 1
    assert drv.enable_cb() is True               # used before enabling: the driver polls instead


@pytest.mark.parametrize("flags, features, code", [
    (3, EVT, vring.E_PACKED_EVENT_FLAGS),
    (vring.RING_EVENT_FLAGS_DESC, 0, vring.E_PACKED_EVENT_DESC),
])
def test_packed_rule_driver_event_flags(gm, flags, features, code):
    drv, q, iov = psetup(gm, features=features)
    drv.add(in_=[1])
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    drv.set_driver_event_flags(flags)
    assert decide(gm, q) is True                 # answered with an interrupt: never a lost one
    assert q[vring.Q_ERROR] == code and q[vring.Q_N_ERRORS] == 1
    drv.add(in_=[1])
    assert vring.pop(gm.mem, q, iov) == -code    # and reported by the next pop
    assert "§2.7.10" in vring.error_message(code)
    assert split_head(vring.pop(gm.mem, q, iov))[1] == 1     # reported once


def test_packed_event_idx_interrupt_at_the_descriptor(gm):
    drv, q, iov = psetup(gm, size=4, features=EVT)
    for want in (False, False, True, False):      # slots 0, 1, 2, 3
        drv.add(in_=[1])
        vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
        drv.set_used_event(2, wrap=1)             # interrupt once slot 2 of lap 1 is used
        assert decide(gm, q) is want
        drv.get_used()
    drv.add(in_=[1])
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    drv.set_used_event(2, wrap=1)                 # a lap ago: no
    assert decide(gm, q) is False
    drv.add(in_=[1])
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    drv.set_used_event(1, wrap=0)                 # slot 1 of lap 0, just used
    assert decide(gm, q) is True


def test_packed_device_event_suppression_and_kicks(gm):
    drv, q, iov = psetup(gm, features=EVT)
    vring.disable_notify(gm.mem, q)
    drv.add(in_=[1])
    assert drv.kick_prepare() is False            # DISABLE
    assert vring.enable_notify(gm.mem, q) is True  # but a list arrived: do not sleep
    vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
    assert vring.enable_notify(gm.mem, q) is False
    off_wrap = int.from_bytes(gm.mem[drv.used:drv.used + 2].tobytes(), "little")
    flags = int.from_bytes(gm.mem[drv.used + 2:drv.used + 4].tobytes(), "little")
    assert (off_wrap, flags) == (1 | 1 << 15, vring.RING_EVENT_FLAGS_DESC)
    drv.add(in_=[1])
    assert drv.kick_prepare() is True             # made slot 1 available: the event's
    drv.add(in_=[1])
    assert drv.kick_prepare() is False            # slot 2: already past the event


def test_packed_enable_notify_without_event_idx(gm):
    drv, q, iov = psetup(gm, features=0)
    vring.disable_notify(gm.mem, q)
    drv.add(in_=[1])
    assert drv.kick_prepare() is False
    vring.pop(gm.mem, q, iov)
    assert vring.enable_notify(gm.mem, q) is False
    drv.add(in_=[1])
    assert drv.kick_prepare() is True


@settings(max_examples=int(os.environ.get("VRING_EXAMPLES", "400")), deadline=None)
@given(st.integers(1, 40), st.integers(0, 200), st.integers(0, 60), st.sampled_from([0, 1, 2, 3]),
       st.integers(0, 0xFFFF))
def test_packed_need_interrupt_matches_reference(size, before, pending, flags, off_wrap):
    """The interrupt decision against the reference's definition: some slot
    used since the last decision is the event's slot in the event's lap."""
    gm = GuestMemory(1 << 16)
    try:
        q = vring.new_queue()
        assert vring.setup_queue(q, gm.size, size, size, 0x1000, 0x800, 0x804, EVT | PACKED) == vring.OK
        off_wrap = (off_wrap & 0x8000) | ((off_wrap & 0x7FFF) % size)
        struct.pack_into("<HH", gm.mem, 0x800, off_wrap, flags)
        now = before + pending
        q[vring.Q_USED_IDX], q[vring.Q_USED_WRAP] = now % size, 1 - (now // size) % 2
        q[vring.Q_PENDING], q[vring.Q_PENDING_SLOTS] = int(pending > 0), pending
        got = decide(gm, q)
        if pending == 0:
            assert got is False
        elif flags == 3:
            assert got is True and q[vring.Q_ERROR] == vring.E_PACKED_EVENT_FLAGS
        elif pending >= size and flags == 2:
            assert got is True                    # a lap or more since: always (spurious at worst)
        else:
            assert got == packed_wants_interrupt(size, before, now, flags, off_wrap)
    finally:
        gm.close()


# -- the device side with a packed queue: next_chain, complete, unpop, the thread

def test_packed_next_chain_complete_unpop_finish(gm):
    drv, q, iov = psetup(gm, features=0)
    args, (notify, irq) = device_args(gm, q, iov)
    try:
        first = drv.add(in_=[8])
        second = drv.add(in_=[8])
        h = vring.next_chain(*args, vring.CHAIN_WRITABLE, 0)
        assert split_head(h) == (first, 1)
        vring.complete(gm.mem, q, h, 5, 7)
        assert drv.has_used() and q[vring.Q_N_BYTES] == 7
        h2 = vring.next_chain(*args, vring.CHAIN_WRITABLE, 0)
        assert split_head(h2)[0] == second
        vring.unpop(q)
        assert vring.next_chain(*args, vring.CHAIN_WRITABLE, 0) == h2
        vring.unpop(q)
        assert vring.next_chain(*args, vring.CHAIN_READABLE, 0) == -vring.E_CHAIN_WRITABLE
        q[vring.Q_STOP] = 1
        mem, _, _, _, isr, _, scratch = args
        assert vring.finish(mem, q, isr, irq, scratch, vring.STOPPED) == vring.STOPPED
        assert os.eventfd_read(irq) == 1
        assert drv.get_used()[:2] == (first, 5) and drv.get_used() is None
    finally:
        os.close(notify)
        os.close(irq)


def test_packed_wait_chain_sleeps_wakes_and_stops(gm):
    drv, q, iov = psetup(gm, size=4, features=EVT | IND)
    notify, irq = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    isr = np.zeros(1, np.uint8)
    scratch = np.zeros(1, np.uint64)
    results = []

    def service():
        while True:
            h = vring.next_chain(gm.mem, q, iov, notify, isr, irq, scratch, vring.CHAIN_ANY, 0)
            results.append(h)
            if h < 0:
                return
            vring.complete(gm.mem, q, h, q[vring.Q_IN_BYTES], 0)

    t = threading.Thread(target=service)
    t.start()
    got = []
    try:
        for k in range(11):                         # nearly three laps of a 4-slot ring, one list at a time
            bid = drv.add(out=[b"ping"], in_=[k + 1], indirect=bool(k % 2))
            if drv.kick_prepare():
                os.eventfd_write(notify, 1)
            deadline = 3000
            while not drv.has_used() and deadline:
                threading.Event().wait(0.01)
                deadline -= 1
            got.append(drv.get_used()[:2])
            assert got[-1] == (bid, k + 1)
        assert os.eventfd_read(irq) >= 1
    finally:
        q[vring.Q_STOP] = 1
        os.eventfd_write(notify, 1)
        t.join(10)
    assert not t.is_alive()
    assert results[-1] == vring.STOPPED and len(results) == 12
    os.close(notify)
    os.close(irq)


# -- snapshots of packed queues

def test_packed_restore_round_trip_and_checks(gm):
    drv, q, iov = psetup(gm, size=6, features=EVT)
    for k in range(8):                               # past the first lap
        drv.add(in_=[1])
        vring.push(gm.mem, q, vring.pop(gm.mem, q, iov), 1)
        drv.get_used()
    saved = vring.queue_state(q)
    assert saved["layout"] == vring.LAYOUT_PACKED
    r = vring.new_queue()
    assert vring.restore_queue(r, saved, gm.size, 6) == vring.OK
    for f in (vring.Q_LAYOUT, vring.Q_LAST_AVAIL, vring.Q_AVAIL_WRAP, vring.Q_USED_IDX, vring.Q_USED_WRAP,
              vring.Q_N_CHAINS):
        assert r[f] == q[f]
    assert (r[vring.Q_IDS:vring.Q_IDS + vring.IDS_WORDS] == q[vring.Q_IDS:vring.Q_IDS + vring.IDS_WORDS]).all()
    drv.add(in_=[1])                                 # the restored queue carries on where it was
    h = vring.pop(gm.mem, r, iov)
    assert h >= 0
    assert vring.queue_state(r)["held_ids"] == [h & 0xFFFF]      # held across a snapshot too
    again = vring.new_queue()
    assert vring.restore_queue(again, vring.queue_state(r), gm.size, 6) == vring.OK
    assert (again[vring.Q_IDS:vring.Q_IDS + vring.IDS_WORDS] == r[vring.Q_IDS:vring.Q_IDS + vring.IDS_WORDS]).all()
    vring.push(gm.mem, r, h, 1)
    assert drv.get_used() is not None
    # Out of its type's bounds: the schema names the field.
    for field, bad in (("layout", 2), ("avail_wrap", 2), ("used_wrap", -1), ("used_idx", -1),
                       ("held_ids", [-5]), ("pending_slots", -1)):
        with pytest.raises(FieldError, match=field):
            vring.restore_queue(vring.new_queue(), {**saved, field: bad}, gm.size, 6)
    # In bounds for the type, impossible for this ring.
    for field, bad in (("last_avail", 6), ("used_idx", 7)):
        assert vring.restore_queue(vring.new_queue(), {**saved, field: bad}, gm.size, 6) == vring.E_SNAPSHOT_STATE, \
            field
    assert vring.restore_queue(vring.new_queue(), saved, gm.size, 4) == vring.E_PACKED_QUEUE_SIZE


# -- property tests: hostile packed rings against the reference walker, and a
# Linux-style driver against the device over many laps

PMEM = 1 << 16


@st.composite
def packed_rings(draw):
    size = draw(st.integers(1, 12))
    indirect_ok = draw(st.booleans())
    sane = draw(st.booleans())
    wrap = draw(st.integers(0, 1))
    pos = draw(st.integers(0, size - 1))
    lap = {0: USED_F, 1: AVAIL_F}
    if sane:
        addr = st.integers(0, PMEM - 4096)
        length = st.integers(0, 64)
        kind = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, NEXT, NEXT | WRITE, INDIRECT])
        marks = st.sampled_from(["this", "this", "this", "other", "used"])
    else:
        addr = st.one_of(st.integers(0, PMEM - 1), st.integers(PMEM - 64, PMEM + 64),
                         st.integers(2**64 - 64, 2**64 - 1), st.integers(0, 2**64 - 1))
        length = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 16 * size, 16 * size + 16]),
                           st.integers(0, 2**32 - 1))
        kind = st.integers(0, 7)
        marks = st.sampled_from(["this", "other", "used", "raw"])
    ring = []
    for k in range(size):
        w = wrap if k >= pos else 1 - wrap          # slots before pos belong to the next lap
        m = draw(marks)
        bits = {"this": lap[w], "other": lap[1 - w], "used": AVAIL_F | USED_F if w else 0,
                "raw": draw(st.sampled_from([0, AVAIL_F, USED_F, AVAIL_F | USED_F]))}[m]
        ring.append((draw(addr), draw(length), draw(st.integers(0, 7)), draw(kind) | bits))
    ind = [(draw(addr), draw(length), draw(st.integers(0, 99)), draw(kind)) for _ in range(draw(st.integers(1, 8)))]
    point_ind = draw(st.booleans())
    held = frozenset(draw(st.lists(st.integers(0, 7), max_size=3)))
    return size, indirect_ok, wrap, pos, ring, ind, point_ind, held


@settings(max_examples=int(os.environ.get("VRING_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(packed_rings())
def test_packed_property_matches_reference_and_stays_inside(r):
    size, indirect_ok, wrap, pos, ring, ind, point_ind, held = r
    gm = GuestMemory(PMEM)
    try:
        mem = gm.mem
        desc = PMEM - 16 * size                      # against the top of RAM
        ind_at = (desc - 16 * len(ind)) & ~15
        for k, (a, ln, i, fl) in enumerate(ind):
            struct.pack_into("<QIHH", mem, ind_at + 16 * k, a, ln, i, fl)
        for k, (a, ln, i, fl) in enumerate(ring):
            if point_ind and k == pos:
                a, ln = ind_at, 16 * len(ind)
            struct.pack_into("<QIHH", mem, desc + 16 * k, a, ln, i, fl)
        q = vring.new_queue()
        feats = PACKED | (IND if indirect_ok else 0)
        assert vring.setup_queue(q, PMEM, size, size, desc, 0x100, 0x104, feats) == vring.OK
        q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP] = pos, wrap
        for b in held:
            q[vring.Q_IDS + (b >> 5)] |= 1 << (b & 31)
        iov = vring.new_iov(size)
        got = vring.pop(mem, q, iov)
        kind, want = walk_packed(mem.tobytes(), PMEM, size, desc, pos, wrap, indirect_ok, held)
        event(kind if got >= -1 else f"{kind}: {vring.error_message(got).split(' (')[0]}")
        if kind == "empty":
            assert got == vring.NO_BUFFER
        elif kind == "invalid":
            assert got <= -vring.E_AVAIL_IDX and vring.error_message(got)
            assert (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (pos, wrap)
        else:
            bid, slots, npos, nwrap, bufs = want
            assert got == bid | slots << 16
            assert vring.chain(iov, q) == bufs
            assert (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (npos, nwrap)
            for a, n, _ in bufs:
                assert 0 <= a and a + n <= PMEM
    finally:
        gm.close()


@settings(max_examples=int(os.environ.get("VRING_EXAMPLES", "400")) // 4, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 9), st.booleans(), st.booleans(),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.booleans(), st.integers(0, 3)), min_size=1,
                max_size=60))
def test_packed_driver_and_device_agree_over_many_laps(size, indirect_ok, event_idx, ops):
    """Random adds (1-3 readable, 0-2 writable buffers, direct or indirect)
    and completions in random order: every buffer comes back once, with its
    ID and length, and the driver's and device's positions agree."""
    gm = GuestMemory(4 << 20)
    try:
        feats = (IND if indirect_ok else 0) | (EVT if event_idx else 0)
        drv = MockDriver(gm, size=size, features=feats | PACKED, slot_bytes=256)
        q, iov = drv.device_queue(), vring.new_iov(size)
        held = []                                     # heads the device popped, not yet used
        expect = {}
        for n_out, n_in, ind, pick in ops:
            if n_out + n_in == 0:
                n_out = 1
            try:
                bid = drv.add(out=[bytes([n_out]) * 3] * n_out, in_=[5] * n_in, indirect=ind)
                expect[bid] = (n_out, n_in)
            except Exception as e:  # noqa: BLE001 - only NoSpace is expected
                assert type(e).__name__ == "NoSpace"
            while True:
                h = vring.pop(gm.mem, q, iov)
                if h == vring.NO_BUFFER:
                    break
                assert h >= 0, vring.error_message(h)
                assert (q[vring.Q_OUT], q[vring.Q_IN]) == expect[h & 0xFFFF]
                held.append(h)
            if held:
                h = held.pop(pick % len(held))
                vring.push(gm.mem, q, h, 5 * expect[h & 0xFFFF][1])
            while (got := drv.get_used()) is not None:
                bid, length, data = got
                assert length == 5 * expect.pop(bid)[1] and all(len(d) == 5 for d in data)
        for h in held:
            vring.push(gm.mem, q, h, 5 * expect[h & 0xFFFF][1])
        while (got := drv.get_used()) is not None:
            expect.pop(got[0])
        assert expect == {} and drv.num_free == size
        assert (q[vring.Q_USED_IDX], q[vring.Q_USED_WRAP]) == (drv.last_used, drv.used_wrap)
        assert (q[vring.Q_LAST_AVAIL], q[vring.Q_AVAIL_WRAP]) == (drv.next_avail, drv.avail_wrap)
        assert q[vring.Q_N_ERRORS] == 0 and not q[vring.Q_IDS:].any()
    finally:
        gm.close()
