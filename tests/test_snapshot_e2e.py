"""Snapshot and restore of the default guest: snapshot at its first LGJ-INIT
line, then restore that snapshot twice in a row; each restored guest runs
the rest of its selftest (console, block, rng, net in a private network
namespace) with the results a guest that was never snapshotted has
(tests/test_boot_e2e.py checks those).

Slow: one emulated boot to /init and two selftests."""
import os
import shutil
import subprocess
import sys

import pytest

from test_boot_e2e import DISK_BYTES, DISK_FILL, GUEST_MAC, HOST_IP, check_selftest, run_console

from guest import build, markers  # noqa: E402 - test_boot_e2e put the repo on sys.path


def _usable():
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        return f"no usable KVM: {why}"
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        return "needs unshare(1) and /dev/net/tun for the guest's private network"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()[:200]}"
    return None


@pytest.mark.slow
def test_default_guest_restored_twice_from_one_snapshot_finishes_its_selftest(tmp_path):
    why = _usable()
    if why is not None:
        pytest.skip(why)
    vmlinux, initrd = build.ensure_guest(log=lambda m: print(m, flush=True))
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_FILL * DISK_BYTES)
    snap = tmp_path / "snap"
    cmdline = build.default_cmdline("selftest", "hvc0")
    launcher = [sys.executable, "-m", "lguest_jit.main"]
    argv = [*launcher, f"--tunnet={HOST_IP}:{GUEST_MAC}", f"--block={disk}", "--rng", f"--initrd={initrd}",
            f"--snapshot={snap}", "--snapshot-on=LGJ-INIT", "--snapshot-exit", "256", str(vmlinux),
            *cmdline.split()]
    err = tmp_path / "snapshot.err"
    status, lines = run_console(["unshare", "--net", "--", *argv], err)
    console = b"".join(raw for _, raw in lines)
    tail = console[-3000:].decode(errors="replace") + "\n--- stderr ---\n" + err.read_text(errors="replace")
    assert status == 0, tail
    first = markers.parse_console(console)
    assert first.init_uptime is not None and not first.done, tail      # stopped at /init, selftest not run
    assert "snapshot written to" in err.read_text()

    # What the disk looked like at snapshot time: each restore starts from it.
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(disk, pristine)
    st = os.stat(disk)
    reports = []
    for i in range(2):
        if i:
            shutil.copyfile(pristine, disk)                        # same inode, old bytes
            os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))    # and the old mtime
        err = tmp_path / f"restore{i}.err"
        status, lines = run_console(["unshare", "--net", "--", *launcher, "restore", str(snap)], err)
        console = b"".join(raw for _, raw in lines)
        tail = console[-3000:].decode(errors="replace") + "\n--- stderr ---\n" + err.read_text(errors="replace")
        assert status == 0, tail
        rep = markers.parse_console(console)
        check_selftest(rep, console, disk, tail)
        # The restored guest did not boot again: no second LGJ-INIT.
        assert rep.init_uptime is None, tail
        reports.append(rep)
    assert [(s.name, s.status) for s in reports[0].steps] == [(s.name, s.status) for s in reports[1].steps]
