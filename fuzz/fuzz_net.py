"""Target: virtio-net's own serve kernels (devices/net._tx_serve,
_rx_serve and the control queue's _ctrl_serve) on hostile rings, against a fake tap: an AF_UNIX datagram
socketpair (message boundaries and truncation as a tap's; never a real
interface).  Each chain the ring engine pops (checked against
tests/naive.py) is handed back and made the only one visible, and the
device's serve kernel takes it itself, so every chain goes through the
device's real loop; with the ring then empty and no notification fd the
kernel ends with E_NOTIFY_READ instead of sleeping.

A shadow says what must happen (§5.1.6):
- transmit: a chain with a device-writable buffer is refused with
  E_CHAIN_WRITABLE, one with fewer than 12 readable bytes with
  E_SHORT_HEADER, each counted; otherwise the readable bytes (header and
  frame, however split) reach the tap as one datagram, or the tap refuses
  it (oversize: EMSGSIZE) and the drop is counted; used length 0.
- receive: a chain with a device-readable buffer is refused with
  E_CHAIN_READABLE, one whose writable buffers hold less than the header
  with E_SHORT_HEADER; otherwise the tap's next frame lands in the writable
  buffers in order (truncated to them), num_buffers is 1 (§5.1.6.4: no
  MRG_RXBUF), and the used length is what was written.
- control (§5.1.6.5, devices/net._ctrl_serve; a device offering
  ``max_pairs`` pairs, 0 for none): a chain without a writable last byte
  is refused with E_NO_STATUS, one with fewer than 2 readable bytes with
  E_SHORT_HEADER; otherwise its ack (the last writable byte) is
  VIRTIO_NET_OK only for VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with exactly a
  le16 count from 1 to max_pairs (returned to the caller first, its chain
  held until the next call acknowledges it), VIRTIO_NET_ERR for anything
  else, each refusal counted by its reason; used length 1.
Nothing else in guest memory changes."""
from __future__ import annotations

import errno
import os
import socket
import struct

import numpy as np

from lguest_jit import vring
from lguest_jit.devices import net
from lguest_jit.hw.libc import POLLIN, POLLOUT, host_iov, pollfds

from .common import Reader, digest, main
from .ring import AVAIL, USED, Ring, apply_writes, gather

MAX_FRAMES = 6
_fds = None


def _files():
    global _fds
    if _fds is None:
        # Row 1 of the poll set: for transmit an eventfd that is already
        # readable, so a tap that fills up ends the kernel (STOPPED) instead
        # of waiting; for receive one that never fires.
        _fds = (os.eventfd(1, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC))
    return _fds


def _frames(r: Reader):
    """Frames the tap will deliver: a 12-byte virtio_net_hdr_v1 from the
    input (num_buffers whatever it says) and a patterned body."""
    out = []
    for _ in range(1 + r.u8() % MAX_FRAMES):
        size = r.u16()
        size = size % 0x800 if size & 0x8000 == 0 else size % 0x4000
        hdr = r.take(net.HDR_SIZE)
        seed = r.u8()
        out.append(hdr + bytes((i * 31 + seed) & 0xFF for i in range(size)))
    return out


def _visible_only_next(ring):
    """Hand the chain just popped back and make it the only one available:
    avail.idx one past it.  Returns the saved avail.idx bytes."""
    vring.unpop(ring.q)
    saved = bytes(ring.mem[AVAIL + 2:AVAIL + 4])
    ring.mem[AVAIL + 2:AVAIL + 4] = np.frombuffer(struct.pack("<H", (int(ring.q[vring.Q_LAST_AVAIL]) + 1) & 0xFFFF),
                                                  np.uint8)
    return saved


def _notify_fields(ring):
    # What _wait_chain writes before it would sleep: used.flags and
    # avail_event.  Their values are the ring engine's (tested there).
    end = USED + 4 + 8 * ring.size
    return [USED, USED + 1, end, end + 1]


def _settle(ring, want, saved) -> None:
    """After a kernel call: the notification fields it may write go into
    the shadow as it left them, and avail.idx goes back to ``saved`` (the
    value before the harness rewrote it) in both."""
    got = ring.mem.tobytes()
    for a in _notify_fields(ring):
        want[a] = got[a]
    ring.mem[AVAIL + 2:AVAIL + 4] = np.frombuffer(saved, np.uint8)
    want[AVAIL + 2:AVAIL + 4] = saved


def _serve(ring, kernel, pfds, tap_fd, stats):
    q = ring.q
    return int(kernel(ring.mem, q, ring.iov, -1, np.zeros(1, np.uint8), _files()[2], np.zeros(1, np.uint64),
                      host_iov(ring.size), tap_fd, pfds, stats))


def _step(ring, kernel, pfds, tap_fd, stats, want: bytearray, refuse: int, saved: bytes):
    """Run the serve kernel over the one chain made visible; check the
    refusal (``refuse``, a positive code, or 0) and the memory it leaves
    against ``want`` (the shadow), then restore avail.idx (``saved``)."""
    q = ring.q
    errors, first = int(q[vring.Q_N_ERRORS]), int(q[vring.Q_ERROR])
    code = _serve(ring, kernel, pfds, tap_fd, stats)
    _settle(ring, want, saved)
    if refuse:
        assert code == -refuse, (code, vring.error_message(code), refuse)
        assert int(q[vring.Q_N_ERRORS]) == errors + 1, "the refusal was not counted"
        assert int(q[vring.Q_ERROR]) == (first or refuse), int(q[vring.Q_ERROR])
    elif code == vring.STOPPED:
        return code
    else:
        # Served, then found the ring empty: the notification read fails
        # (the fd is -1).  That is the harness's doing: not counted.
        assert code == -vring.E_NOTIFY_READ, (code, vring.error_message(code))
        q[vring.Q_N_ERRORS], q[vring.Q_ERROR] = errors, first
    assert ring.mem.tobytes() == bytes(want), "guest memory differs from the shadow"
    return code


def _put_at(mem: bytearray, bufs, offset: int, data: bytes) -> None:
    """Write ``data`` at byte ``offset`` of the buffers taken in order."""
    for a, ln, _w in bufs:
        while offset < ln and data:
            mem[a + offset] = data[0]
            data = data[1:]
            offset += 1
        if not data:
            return
        offset -= ln


def _publish(want: bytearray, index: int) -> None:
    struct.pack_into("<H", want, USED + 2, index & 0xFFFF)


def _used(want: bytearray, ring, index: int, head: int, length: int) -> None:
    elem = USED + 4 + 8 * (index % ring.size)
    struct.pack_into("<II", want, elem, head, length)
    _publish(want, index + 1)


def transmit(ring, results, sent):
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        tap.setblocking(False)
        peer.setblocking(False)
        # About a tap's own limit (64 KiB frames), so oversize frames occur.
        tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        limit = tap.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        pfds = pollfds(2)
        pfds[0] = (tap.fileno(), POLLOUT)
        pfds[1] = (_files()[0], POLLIN)
        stats = np.zeros(net.NS_FIELDS, np.int64)
        for head, bufs in ring.chains(results):
            saved = _visible_only_next(ring)
            # After the avail index is rewritten: a buffer may cover the ring itself.
            frame = gather(ring.mem.tobytes(), bufs)
            want = bytearray(ring.mem.tobytes())
            readable = sum(ln for _a, ln, w in bufs if not w)
            refuse = vring.E_CHAIN_WRITABLE if any(w for _a, _l, w in bufs) else \
                vring.E_SHORT_HEADER if readable < net.HDR_SIZE else 0
            index = int(ring.q[vring.Q_USED_IDX])
            dropped = int(stats[net.NS_TX_DROPPED])
            if refuse:
                _publish(want, index)       # the kernel publishes before it returns
            else:
                _used(want, ring, index, head, 0)
            code = _step(ring, net._tx_serve, pfds, tap.fileno(), stats, want, refuse, saved)
            if refuse:
                results.append(("refused", code))
                break
            if code == vring.STOPPED:       # the tap was full: not for a single frame
                raise AssertionError(("a lone frame found the tap full", len(frame), limit))
            try:
                got = peer.recv(len(frame) + 1)
            except BlockingIOError:
                got = None
            if got is None:
                # Refused by the tap (too big for one datagram): dropped, counted.
                assert int(stats[net.NS_TX_DROPPED]) == dropped + 1, "a refused frame was not counted"
                assert int(stats[net.NS_TX_ERRNO]) == errno.EMSGSIZE and len(frame) > limit - 64, \
                    (len(frame), limit, int(stats[net.NS_TX_ERRNO]))
                results.append((head, "dropped", int(stats[net.NS_TX_ERRNO])))
            else:
                assert got == frame, "the tap got other bytes than the chain's readable part"
                assert int(stats[net.NS_TX_DROPPED]) == dropped
                sent.append(got)
                results.append((head, len(got)))
    finally:
        tap.close()
        peer.close()


def receive(ring, results, frames):
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        tap.setblocking(False)
        tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        pfds = pollfds(2)
        pfds[0] = (tap.fileno(), POLLIN)
        pfds[1] = (_files()[1], POLLIN)
        stats = np.zeros(net.NS_FIELDS, np.int64)
        pending = list(frames)
        for head, bufs in ring.chains(results):
            if not pending:
                results.append("no frame")
                break
            peer.send(pending[0])
            saved = _visible_only_next(ring)
            want = bytearray(ring.mem.tobytes())
            writable = [b for b in bufs if b[2]]
            room = sum(ln for _a, ln, _w in writable)
            refuse = vring.E_CHAIN_READABLE if len(writable) != len(bufs) else \
                vring.E_SHORT_HEADER if room < net.HDR_SIZE else 0
            index = int(ring.q[vring.Q_USED_IDX])
            if refuse:
                _publish(want, index)
            else:
                landed = pending.pop(0)[:room]
                apply_writes(want, writable, landed)
                # Then num_buffers = 1 (§5.1.6.4), over whatever the frame put
                # there (buffers that alias each other included).
                _put_at(want, writable, net.HDR_NUM_BUFFERS, struct.pack("<H", 1))
                _used(want, ring, index, head, len(landed))
            code = _step(ring, net._rx_serve, pfds, tap.fileno(), stats, want, refuse, saved)
            assert int(stats[net.NS_RX_SPURIOUS]) == 0 and int(stats[net.NS_RX_ERRNO]) == 0, stats
            if refuse:
                results.append(("refused", code))
                break
            results.append((head, len(landed)))
    finally:
        tap.close()
        peer.close()


def _ctrl_verdict(cmd: bytes, max_pairs: int):
    """The shadow's answer to a command's readable bytes: (ack, reason)."""
    cls, op, data = cmd[0], cmd[1], cmd[2:]
    if cls != net.VIRTIO_NET_CTRL_MQ or max_pairs == 0:
        return net.VIRTIO_NET_ERR, net.NC_BAD_CLASS
    if op != net.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
        return net.VIRTIO_NET_ERR, net.NC_BAD_COMMAND
    if len(data) != 2:
        return net.VIRTIO_NET_ERR, net.NC_BAD_LENGTH
    if not 1 <= struct.unpack("<H", data)[0] <= max_pairs:
        return net.VIRTIO_NET_ERR, net.NC_BAD_PAIRS
    return net.VIRTIO_NET_OK, net.NC_OK


def control(ring, results, max_pairs: int):
    mq = np.zeros(net.MQ_FIELDS, np.int64)
    mq[net.MQ_MAX], mq[net.MQ_ACTIVE], mq[net.MQ_HELD] = max_pairs, 1, -1
    buf = np.zeros(net.CTRL_BUF, np.uint8)
    q = ring.q
    for head, bufs in ring.chains(results):
        saved = _visible_only_next(ring)
        want = bytearray(ring.mem.tobytes())
        cmd = gather(ring.mem.tobytes(), [b for b in bufs if not b[2]])
        refuse = vring.E_NO_STATUS if not bufs[-1][2] or bufs[-1][1] == 0 else \
            vring.E_SHORT_HEADER if len(cmd) < net.CTRL_HDR else 0
        index = int(q[vring.Q_USED_IDX])
        counts = mq[net.NC_OK:].copy()
        errors, first = int(q[vring.Q_N_ERRORS]), int(q[vring.Q_ERROR])
        if refuse:
            _publish(want, index)
        else:
            ack, reason = _ctrl_verdict(cmd, max_pairs)
            counts[reason - net.NC_OK] += 1
            want[bufs[-1][0] + bufs[-1][1] - 1] = ack
            _used(want, ring, index, head, 1)

        def call():
            return int(net._ctrl_serve(ring.mem, q, ring.iov, -1, np.zeros(1, np.uint8), _files()[2],
                                       np.zeros(1, np.uint64), buf, mq))
        code = call()
        if code == net.CTRL_APPLY:
            # What Net._serve_ctrl does: apply the count, call again to ack.
            assert not refuse and int(mq[net.MQ_HELD]) == head and 1 <= int(mq[net.MQ_WANTED]) <= max_pairs
            assert int(q[vring.Q_USED_IDX]) == index, "a held command was completed before it was applied"
            mq[net.MQ_ACTIVE] = mq[net.MQ_WANTED]
            code = call()
            assert int(mq[net.MQ_HELD]) == -1
        _settle(ring, want, saved)
        if refuse:
            assert code == -refuse, (code, vring.error_message(code), refuse)
            assert int(q[vring.Q_N_ERRORS]) == errors + 1, "the refusal was not counted"
        else:
            assert code == -vring.E_NOTIFY_READ, (code, vring.error_message(code))
            q[vring.Q_N_ERRORS], q[vring.Q_ERROR] = errors, first
        assert (mq[net.NC_OK:] == counts).all(), (mq[net.NC_OK:], counts)
        assert ring.mem.tobytes() == bytes(want), "guest memory differs from the shadow"
        if refuse:
            results.append(("refused", code))
            break
        results.append((head, int(ring.mem[bufs[-1][0] + bufs[-1][1] - 1]), int(mq[net.MQ_ACTIVE])))


def one_input(data: bytes) -> str:
    r = Reader(data)
    mode = r.u8()
    rx = bool(mode & 1)
    frames = _frames(r) if rx else []
    # Bit 1 of an even mode byte: the control queue, offering mode >> 2 & 3 pairs.
    ctrl = not rx and bool(mode & 2)
    ring = Ring(r)
    results, sent = [], []
    if rx:
        receive(ring, results, frames)
    elif ctrl:
        control(ring, results, mode >> 2 & 3)
    else:
        transmit(ring, results, sent)
    return digest(results, ring.mem.tobytes(), b"".join(sent))


if __name__ == "__main__":
    main("fuzz.fuzz_net")
