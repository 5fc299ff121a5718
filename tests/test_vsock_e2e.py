"""virtio-vsock end to end: the default guest (its static `vsock` tool,
guest/tools/vsock.c) with --vsock.  Guest -> host and host -> guest each
echo 16 MiB intact, 8 host connections at once, and a guest listener that
never reads holds only its own sender (credit), not the others.

Slow: the guest kernel is emulated on our PVM hosts."""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guest import build, markers  # noqa: E402
from test_boot_e2e import BOOT_TIMEOUT_S  # noqa: E402

CID = 7
MIB16 = 16 << 20


def _echo_server(path, stop):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(1.0)

    def serve(c):
        with c:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    srv.close()


def _connect(path, port, timeout=300):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"CONNECT %d\n" % port)
    s.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n"):
        got = s.recv(1)
        assert got, f"closed before OK (had {line!r})"
        line += got
    assert line.startswith(b"OK "), line
    s.settimeout(None)          # the guest kernel is emulated: 16 MiB takes minutes
    return s


def _echo_through(path, port, data, timeout=BOOT_TIMEOUT_S):
    """Send ``data`` to the guest's echo listener and read it back (a
    writer and a reader thread; a stall shows as a short result)."""
    s = _connect(path, port)
    got = bytearray()

    def reader():
        while True:
            try:
                b = s.recv(1 << 16)
            except OSError:
                break
            if not b:
                break
            got.extend(b)

    def writer():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    threads[0].join(timeout)
    s.close()
    return bytes(got)


@pytest.mark.slow
def test_vsock_echo_both_ways_many_connections_and_a_stalled_reader(tmp_path):
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        pytest.skip(f"no usable KVM: {why}")
    vmlinux, initrd = build.ensure_guest(log=lambda m: print(m, flush=True))
    path = str(tmp_path / "v")
    stop = threading.Event()
    threading.Thread(target=_echo_server, args=(path + "_6000", stop), daemon=True).start()
    done = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)      # the guest waits here until we finish
    done.bind(path + "_6001")
    done.listen(1)
    stats_file = tmp_path / "stats.json"
    argv = [sys.executable, "-m", "lguest_jit.main", f"--vsock={CID}:{path}", f"--initrd={initrd}",
            f"--stats-json={stats_file}", "256", str(vmlinux), *build.default_cmdline("vsock", "hvc0").split()]
    err = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    console = bytearray()
    ready = threading.Event()

    def pump():
        for raw in proc.stdout:
            console.extend(raw)
            if b"LGJ-VSOCK-READY" in raw:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    results = {}
    try:
        assert ready.wait(BOOT_TIMEOUT_S), console[-3000:].decode(errors="replace")
        # A guest listener that never reads: its sender fills the credit and stops.
        held = _connect(path, 5001)
        held.setblocking(False)
        held_sent = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                held_sent += held.send(b"z" * 65536)
            except BlockingIOError:
                time.sleep(0.2)
                try:
                    held_sent += held.send(b"z" * 65536)
                except BlockingIOError:
                    break
        results["held_sent"] = held_sent
        # ... and the other connections go on: 16 MiB host -> guest -> host.
        data = os.urandom(MIB16)
        t0 = time.monotonic()
        back = _echo_through(path, 5000, data)
        results["h2g"] = back == data
        results["h2g_bytes"] = len(back)
        results["h2g_s"] = time.monotonic() - t0
        # 8 connections at once, 1 MiB each.
        outs = [None] * 8
        blobs = [os.urandom(1 << 20) for _ in range(8)]

        def one(k):
            outs[k] = _echo_through(path, 5000, blobs[k])
        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        results["eight"] = [outs[k] == blobs[k] for k in range(8)]
        held.close()
        c, _ = done.accept()
        c.close()
        status = proc.wait(BOOT_TIMEOUT_S)
    finally:
        stop.set()
        proc.kill()
        proc.wait()
        err.close()
    tail = console[-3000:].decode(errors="replace") + (tmp_path / "stderr.txt").read_text(errors="replace")[-2000:]
    print(results)
    rep = markers.parse_console(bytes(console))
    assert status == 0, tail
    assert results["h2g"], tail
    assert results["eight"] == [True] * 8, tail
    # The stalled connection took no more than the guest's credit plus the
    # socket buffers: the host's sender was held, not the launcher.
    assert 0 < results["held_sent"] < 16 << 20, results
    g2h = rep.step("vsock-g2h")
    assert g2h is not None and g2h.status == "OK" and f"vsock-check OK {MIB16}" in g2h.detail, tail
    assert rep.step("vsock-host-done").status == "OK", tail
    import json
    stats = json.loads(stats_file.read_text())
    vq = next(v for k, v in stats["queues"].items() if k.startswith("vsock"))
    assert sum(vq["tx"]["rules"].values()) == 0 and vq["tx"]["errors"] == 0, vq
    assert vq["rx"]["bytes"] >= MIB16 + 8 * (1 << 20) and vq["tx"]["bytes"] >= 2 * MIB16, vq
    # The stalled reader used up its credit: the device asked for more
    # (CREDIT_REQUEST, the guest answers with its unchanged credit) and
    # went on with the others.
    assert vq["rx"]["credit_requests_sent"] >= 1, vq
