"""virtio-console brought up by Linux's driver sequence over the PCI bus,
carrying bytes through real ptys and pipes (no hypervisor)."""
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time

import pytest

from lguest_jit import pci, vring
from lguest_jit.devices import Console, raw_terminal
from lguest_jit.devices import console as con
from lguest_jit.hw.memory import GuestMemory
from lguest_jit.testing import VirtioPciDriver

RAW_BITS = termios.ISIG | termios.ICANON | termios.ECHO


@pytest.fixture
def fds():
    """Every fd a test opens goes here and is closed afterwards."""
    opened = []

    def track(*new):
        opened.extend(new)
        return new
    yield track
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def piped_console(machine, fds):
    """A console between two pipes, brought up: (dev, drv, input write end,
    output read end, logged messages)."""
    in_r, in_w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    logged = []
    dev = Console(in_r, out_w, log=logged.append)
    return dev, bring_up(machine, dev), in_w, out_r, logged


def bring_up(machine, dev, slot_bytes=4096):
    gm, bus = machine
    return VirtioPciDriver.attach(bus, gm, dev, slot_bytes=slot_bytes)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def read_exactly(fd, n, timeout=5.0):
    """Read n bytes from fd or fail (never blocks past timeout)."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"got {got!r}, wanted {n} bytes")
        got += os.read(fd, n - len(got))
    return got


def nothing_to_read(fd, wait=0.1):
    return not select.select([fd], [], [], wait)[0]


def post_rx(drv, count=8, size=64):
    for _ in range(count):
        drv.queues[con.RECEIVEQ].add(in_=[size])
    drv.kick(con.RECEIVEQ)


def receive(drv, n, timeout=5.0):
    """Reap receive buffers until n bytes of input arrived."""
    got = b""
    while len(got) < n:
        _, length, data = drv.wait_used(con.RECEIVEQ, timeout)
        got += b"".join(data)[:length]
    return got


def transmit(drv, *segments):
    drv.queues[con.TRANSMITQ].add(out=list(segments))
    drv.kick(con.TRANSMITQ)
    _, length, _ = drv.wait_used(con.TRANSMITQ)
    assert length == 0                          # the device wrote nothing into the chain


def needs_reset(drv):
    return drv.wait_status(pci.DEVICE_NEEDS_RESET)


# ---------------------------------------------------------------------------
# Device, config space


def test_features_and_config(machine, fds):
    r, w = fds(*os.pipe())
    drv = bring_up(machine, Console(r, w))
    assert drv.device_id == 0x1040 + con.VIRTIO_ID_CONSOLE
    assert drv.features >> con.VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert drv.features >> vring.VIRTIO_RING_F_EVENT_IDX & 1
    for off, size in ((con.CFG_COLS, 2), (con.CFG_ROWS, 2), (con.CFG_MAX_NR_PORTS, 4), (con.CFG_EMERG_WR, 4)):
        assert drv.config_read(off, size) == 0
    # Read-only fields stay put and print nothing.
    drv.config_write(con.CFG_COLS, 2, 80)
    drv.config_write(con.CFG_MAX_NR_PORTS, 4, 5)
    drv.config_write(con.CFG_EMERG_WR + 1, 1, ord("x"))
    assert drv.config_read(con.CFG_COLS, 2) == 0 and drv.config_read(con.CFG_MAX_NR_PORTS, 4) == 0
    assert nothing_to_read(r)


def test_console_rejects_bad_fds():
    with pytest.raises(ValueError):
        Console(0, -1)
    with pytest.raises(ValueError):
        Console("0", 1)
    with pytest.raises(ValueError):
        raw_terminal(-3)


# ---------------------------------------------------------------------------
# Both ways through a pty (the "must show")


def test_pty_carries_data_both_ways_and_emergency_write(machine, fds):
    master, slave = fds(*os.openpty())
    dev = Console(slave, slave)
    with raw_terminal(slave) as term:
        assert term.active and not termios.tcgetattr(slave)[3] & RAW_BITS
        drv = bring_up(machine, dev)
        post_rx(drv)
        os.write(master, b"hello\n")
        assert receive(drv, 6) == b"hello\n"
        assert nothing_to_read(master), "raw mode: no echo"
        transmit(drv, b"wor", b"", b"ld")
        assert read_exactly(master, 5) == b"world"
        drv.config_write(con.CFG_EMERG_WR, 4, 0x4100 | ord("!"))     # only the low byte counts
        drv.config_write(con.CFG_EMERG_WR, 1, ord("?"))
        assert read_exactly(master, 2) == b"!?"
        # ISIG is off: ^C is a byte for the guest, not a signal.
        os.write(master, b"\x03")
        assert receive(drv, 1) == b"\x03"
    c = dev.counters()
    assert c["receiveq"]["bytes"] == 7 and c["receiveq"]["requests"] == 2
    assert c["transmitq"]["bytes"] == 5 and c["transmitq"]["requests"] == 1
    assert c["receiveq"]["interrupts"] >= 1 and c["transmitq"]["notifications"] >= 1
    assert dev.emergency_bytes == 2


def test_large_input_fills_several_buffers_in_order(machine, fds):
    r, w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    drv = bring_up(machine, Console(r, out_w))
    post_rx(drv, count=64, size=100)
    blob = bytes(range(256)) * 20                   # 5120 bytes: > 50 buffers
    os.write(w, blob)
    assert receive(drv, len(blob)) == blob


# ---------------------------------------------------------------------------
# ^C


def ctrl_c(drv, w, dev):
    seen = dev.ctrl_c_seen
    os.write(w, b"\x03")
    assert receive(drv, 1) == b"\x03"               # every ^C reaches the guest
    # The guest sees it before the input thread looks at the clock: wait for that.
    assert wait_for(lambda: dev.ctrl_c_seen == seen + 1)


def test_three_ctrl_c_within_a_second_end_the_launcher(machine, fds):
    r, w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    called = threading.Event()
    dev = Console(r, out_w, on_interrupt_exit=called.set, log=lambda m: None)
    dev.clock = lambda: 100.0                        # a loaded machine must not make it flaky
    drv = bring_up(machine, dev)
    post_rx(drv, count=16)
    ctrl_c(drv, w, dev)
    ctrl_c(drv, w, dev)
    assert not called.wait(0.05), "two ^C are just input"
    os.write(w, b"x")                                # other input in between starts the count again
    assert receive(drv, 1) == b"x"
    ctrl_c(drv, w, dev)
    ctrl_c(drv, w, dev)
    assert not called.wait(0.05)
    ctrl_c(drv, w, dev)
    assert called.wait(5)
    assert wait_for(lambda: not dev._threads[con.RECEIVEQ].is_alive())
    transmit(drv, b"still here")                     # the device itself lives until the launcher stops it
    assert read_exactly(out_r, 10) == b"still here"


def test_ctrl_c_too_slow_or_not_alone_does_not_exit(machine, fds):
    r, w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    called = threading.Event()
    dev = Console(r, out_w, on_interrupt_exit=called.set)
    now = [100.0]
    dev.clock = lambda: now[0]
    drv = bring_up(machine, dev)
    post_rx(drv, count=16)
    for step in (0.0, 0.6, 0.6):                     # third one 1.2 s after the first
        now[0] += step
        ctrl_c(drv, w, dev)
    assert not called.wait(0.05)
    os.write(w, b"\x03\x03")                         # two in one chunk: not lone ^C
    assert receive(drv, 2) == b"\x03\x03"
    now[0] += 0.1
    ctrl_c(drv, w, dev)                                   # last three lone ones: 1.2 s apart, then a non-lone chunk
    assert not called.wait(0.05)
    now[0] += 0.1
    ctrl_c(drv, w, dev)
    now[0] += 0.1
    ctrl_c(drv, w, dev)                                   # three lone ^C within 0.2 s
    assert called.wait(5)


def test_three_ctrl_c_without_callback_is_fatal(machine, fds):
    r, w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    messages = []
    dev = Console(r, out_w, on_fatal=messages.append, log=lambda m: None)
    dev.clock = lambda: 100.0
    drv = bring_up(machine, dev)
    post_rx(drv)
    for _ in range(3):
        ctrl_c(drv, w, dev)
    assert wait_for(lambda: messages)
    assert "three ^C" in messages[0]


# ---------------------------------------------------------------------------
# Pipes, end of input, failing output


def test_pipes_and_eof_stops_only_input(machine, fds):
    dev, drv, in_w, out_r, logged = piped_console(machine, fds)
    in_r = dev.input_fd
    assert raw_terminal(in_r).start() is False       # a pipe is no tty: raw mode is a no-op
    post_rx(drv, count=4)
    os.write(in_w, b"abc")
    assert receive(drv, 3) == b"abc"
    os.close(in_w)                                   # EOF
    assert wait_for(lambda: not dev._threads[con.RECEIVEQ].is_alive())
    assert dev.input_ended and logged and "end of input" in logged[0]
    rx = drv.queues[con.RECEIVEQ]
    assert rx.get_used() is None and rx.num_free == rx.size - 3, "buffers after EOF stay with the driver"
    assert dev._threads[con.TRANSMITQ].is_alive()
    transmit(drv, b"after eof")
    assert read_exactly(out_r, 9) == b"after eof"
    assert not drv.status & pci.DEVICE_NEEDS_RESET


def test_pty_hangup_ends_input_and_output_quietly(machine):
    master, slave = os.openpty()
    logged = []
    dev = Console(slave, slave, log=logged.append)
    try:
        drv = bring_up(machine, dev)
        post_rx(drv)
        os.close(master)                             # the terminal goes away
        assert wait_for(lambda: not dev._threads[con.RECEIVEQ].is_alive())
        assert dev.input_ended and drv.queues[con.RECEIVEQ].get_used() is None
        transmit(drv, b"nobody reads this")
        assert dev.counters()["transmitq"]["write_errors"] == 1
        assert wait_for(lambda: len(logged) == 2)        # logged after the buffer went back
        assert not drv.status & pci.DEVICE_NEEDS_RESET
    finally:
        dev.close()
        os.close(slave)


def test_no_input_fd(machine, fds):
    out_r, out_w = fds(*os.pipe())
    dev = Console(None, out_w)
    drv = bring_up(machine, dev)
    post_rx(drv)
    transmit(drv, b"out only")
    assert read_exactly(out_r, 8) == b"out only"
    assert drv.queues[con.RECEIVEQ].get_used() is None


def test_partial_writes_to_a_small_nonblocking_pipe(machine, fds):
    in_r, in_w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(out_w, False)
    dev = Console(in_r, out_w)
    drv = bring_up(machine, dev, slot_bytes=1 << 16)
    blob = os.urandom(64 << 10)
    got = bytearray()

    def slow_reader():
        deadline = time.monotonic() + 20
        while len(got) < len(blob) and time.monotonic() < deadline:
            if select.select([out_r], [], [], 0.1)[0]:
                got.extend(os.read(out_r, 1000))
                time.sleep(0.001)
    reader = threading.Thread(target=slow_reader)
    reader.start()
    tx = drv.queues[con.TRANSMITQ]
    # Two chains of odd-sized segments, so partial writes land mid-segment.
    half = len(blob) // 2
    for part in (blob[:half], blob[half:]):
        cuts = [0, 1, 4000, 4097, 10000, 20001, len(part)]
        tx.add(out=[part[a:b] for a, b in zip(cuts, cuts[1:])])
    drv.kick(con.TRANSMITQ)
    drv.wait_used(con.TRANSMITQ, timeout=20)
    drv.wait_used(con.TRANSMITQ, timeout=20)
    reader.join(25)
    assert not reader.is_alive()
    assert bytes(got) == blob
    c = dev.counters()["transmitq"]
    assert c["bytes"] == len(blob) and c["write_errors"] == 0
    assert c["output_full_waits"] > 0, "the pipe filled up: the EAGAIN path ran"



def test_closed_output_drops_data_and_keeps_going(machine, fds):
    dev, drv, in_w, out_r, logged = piped_console(machine, fds)
    os.close(out_r)                                  # EPIPE from now on (Python ignores SIGPIPE)
    transmit(drv, b"lost")
    transmit(drv, b"lost too")
    c = dev.counters()["transmitq"]
    assert c["write_errors"] == 2 and c["dropped_bytes"] == 12 and c["bytes"] == 0
    assert wait_for(lambda: logged) and "EPIPE" in logged[0]
    time.sleep(0.05)
    assert len(logged) == 1                          # reported once
    drv.config_write(con.CFG_EMERG_WR, 4, ord("x"))
    assert dev.emergency_dropped == 1 and dev.emergency_bytes == 0
    post_rx(drv)
    os.write(in_w, b"in")
    assert receive(drv, 2) == b"in"                   # input unaffected


# ---------------------------------------------------------------------------
# Driver errors


def test_writable_buffer_in_transmitq_needs_reset(machine, fds):
    r, w = fds(*os.pipe())
    drv = bring_up(machine, Console(r, w))
    drv.queues[con.TRANSMITQ].add(out=[b"x"], in_=[4])
    drv.kick(con.TRANSMITQ)
    assert needs_reset(drv)


def test_readable_buffer_in_receiveq_needs_reset(machine, fds):
    r, w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    drv = bring_up(machine, Console(r, out_w))
    drv.queues[con.RECEIVEQ].add(out=[b"x"], in_=[4])
    drv.kick(con.RECEIVEQ)
    os.write(w, b"data")
    assert needs_reset(drv)
    assert "receive queue" in vring.error_message(vring.E_CHAIN_READABLE)


# ---------------------------------------------------------------------------
# Lifecycle


def test_reset_and_close_join_threads(fds):
    in_r, in_w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())
    gm = GuestMemory(32 << 20)
    bus = pci.Bus(gm)
    before = threading.active_count()
    dev = Console(in_r, out_w)
    drv = bring_up((gm, bus), dev)
    assert threading.active_count() == before + 2
    post_rx(drv)                                     # input thread asleep in poll, output in the eventfd read
    drv.reset()
    assert threading.active_count() == before and not dev.running
    drv.init()                                       # and back
    post_rx(drv)
    os.write(in_w, b"again")
    assert receive(drv, 5) == b"again"
    transmit(drv, b"ok")
    assert read_exactly(out_r, 2) == b"ok"
    # Output blocked on a full pipe must not hold up the launcher's exit.
    os.set_blocking(out_w, False)
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    try:
        while True:
            os.write(out_w, b"f" * 512)
    except BlockingIOError:
        pass
    sent = dev.counters()["transmitq"]["requests"]
    drv.queues[con.TRANSMITQ].add(out=[b"z" * 2000])
    drv.kick(con.TRANSMITQ)
    assert wait_for(lambda: dev.counters()["transmitq"]["requests"] == sent + 1)
    time.sleep(0.05)                                 # let it reach poll(POLLOUT)
    assert drv.queues[con.TRANSMITQ].get_used() is None
    bus.close()
    assert threading.active_count() == before
    gm.close()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_stalled_blocking_output_does_not_hold_up_reset_and_no_fd_leaks(fds):
    in_r, in_w = fds(*os.pipe())
    out_r, out_w = fds(*os.pipe())                   # blocking, and nobody reads it
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    before = open_fds()
    gm = GuestMemory(32 << 20)
    bus = pci.Bus(gm)
    dev = Console(in_r, out_w)
    drv = bring_up((gm, bus), dev, slot_bytes=1 << 16)
    drv.queues[con.TRANSMITQ].add(out=[b"s" * 50000])
    drv.kick(con.TRANSMITQ)
    assert wait_for(lambda: dev.counters()["transmitq"]["output_full_waits"] > 0)
    assert os.get_blocking(out_w), "the caller's fd is left as it was"
    drv.reset()                                      # would hang in a blocking write
    assert not dev.running
    drv.init()
    drv.reset()
    bus.close()
    gm.close()
    assert open_fds() == before
    assert len(os.read(out_r, 1 << 16)) == 4096


# ---------------------------------------------------------------------------
# raw_terminal


def test_raw_terminal_restores_on_exit_and_exception(fds):
    master, slave = fds(*os.openpty())
    before = termios.tcgetattr(slave)
    assert before[3] & RAW_BITS == RAW_BITS
    with raw_terminal(slave):
        assert termios.tcgetattr(slave)[3] & RAW_BITS == 0
    assert termios.tcgetattr(slave) == before
    with pytest.raises(RuntimeError):
        with raw_terminal(slave):
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # handlers put back too


CHILD = textwrap.dedent("""
    import signal, sys, time
    from lguest_jit.devices.console import raw_terminal
    # The signals at their defaults, as a terminal session has them: a test
    # run started under nohup or with & hands them down ignored, and
    # raw_terminal rightly leaves an ignored signal ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    fd, how = int(sys.argv[1]), sys.argv[2]
    term = raw_terminal(fd)
    if how == "atexit":
        term.start()
        print("ready", flush=True)
        sys.exit(3)
    with term:
        print("ready", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, "atexit"],
                         ids=lambda h: getattr(h, "name", h))
def test_raw_terminal_restored_when_process_is_signalled_or_exits(fds, how):
    master, slave = fds(*os.openpty())
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(slave), str(how)], pass_fds=(slave,),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "child never got ready"
        assert proc.stdout.readline() == b"ready\n"
        if how == "atexit":
            assert proc.wait(30) == 3
        else:
            assert termios.tcgetattr(slave)[3] & RAW_BITS == 0, "child switched the tty to raw"
            proc.send_signal(how)
            assert proc.wait(30) == -how               # died of the signal, as without the handler
        assert termios.tcgetattr(slave) == before
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
