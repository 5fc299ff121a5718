"""The lguest use case end to end: the default guest boots from its ext4
root disk (`--block=<image> root=/dev/vda`), runs the selftest (scratch disk
vdb), writes a file to its root file system and reboots with `reboot -f`;
the launcher re-executes itself, the second boot finds the file and powers
off; afterwards the image file on the host holds it (read with debugfs).

Slow: two Linux boots, each 25-50 s of mostly emulated kernel code on a
software-KVM host.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guest import build, markers  # noqa: E402
from test_boot_e2e import run_console  # noqa: E402

BOOT_TIMEOUT_S = 1500          # two boots; a hung guest fails the test instead of hanging CI
SCRATCH_BYTES = 1 << 20
SCRATCH_FILL = b"\xee"


def _e2fs(tool: str) -> str | None:
    return shutil.which(tool) or next((p for p in (f"/sbin/{tool}", f"/usr/sbin/{tool}") if os.path.exists(p)), None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_root_disk_boot_selftest_write_reboot_and_the_file_persists(tmp_path):
    from lguest_jit.hw.kvm import kvm_available
    why = kvm_available()
    if why is not None:
        pytest.skip(f"no usable KVM: {why}")
    debugfs, e2fsck = _e2fs("debugfs"), _e2fs("e2fsck")
    if debugfs is None or e2fsck is None:
        pytest.skip("needs debugfs and e2fsck (e2fsprogs; python -m guest.build installs it)")
    # A fresh machine builds the guest here (a build failure fails the test).
    vmlinux, _ = build.ensure_guest(log=lambda m: print(m, flush=True))
    pristine = build.ensure_rootfs(log=lambda m: print(m, flush=True))
    pristine_sha = _sha256(pristine)

    root = tmp_path / "root.img"
    subprocess.run(["cp", "--sparse=always", str(pristine), str(root)], check=True)
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(SCRATCH_FILL * SCRATCH_BYTES)
    cmdline = build.default_cmdline("persist", "hvc0", root="/dev/vda")
    argv = [sys.executable, "-m", "lguest_jit.main", "--rng", f"--block={root}", f"--block={scratch}",
            "256", str(vmlinux), *cmdline.split()]
    t0 = time.monotonic()
    status, lines = run_console(argv, tmp_path / "stderr.txt", BOOT_TIMEOUT_S, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    console = b"".join(raw for _, raw in lines)
    tail = console[-5000:].decode(errors="replace") + "\n--- stderr ---\n" + \
        (tmp_path / "stderr.txt").read_text(errors="replace")[-2000:]
    print(f"\nroot-disk guest: exit status {status} after {time.monotonic() - t0:.1f} s wall")
    for when, raw in lines:
        text = raw.decode(errors="replace").strip()
        if "LGJ-" in text or "Run /sbin/init" in text or "VFS: Mounted root" in text:
            print(f"  wall {when - t0:7.1f} s  {text[:110]}")

    assert status == 0, tail
    boots = markers.parse_boots(console)
    assert len(boots) == 2, tail
    first, second = boots

    # Boot 1: from the root disk, the selftest on the scratch disk, the file, the reboot.
    assert b"VFS: Mounted root (ext4 filesystem)" in console, tail
    assert first.step("cmdline").fields()["root"] == "/dev/vda"
    assert first.step("cmdline").fields()["scratch"] == "vdb"
    for name in ("mount-proc", "mount-sysfs", "mount-devtmpfs", "console", "pci", "virtio", "hwrng", "block"):
        assert first.step(name) is not None and first.step(name).status == "OK", (name, tail)
    assert first.step("net").status == "SKIP"          # no --tunnet here
    assert first.failed == [], tail
    assert first.step("block").fields()["dev"] == "vdb"
    nbytes = int(first.step("block").fields()["bytes"])
    data = scratch.read_bytes()
    assert data[:nbytes] == markers.block_pattern(nbytes)
    assert data[nbytes:] == SCRATCH_FILL * (SCRATCH_BYTES - nbytes)
    token = first.step("persist").fields()["wrote"]
    assert first.rebooted and not first.done, tail

    # Boot 2 (the launcher re-executed itself): the file survived.
    assert second.step("persist").status == "OK", tail
    assert second.step("persist").fields() == {"found": token, "boot": "2", "file": "/var/lgj-persist"}
    assert second.done and second.workload == "persist" and second.failed == [], tail
    assert b"segfault at" not in console, tail

    # On the host: the image file holds what the guest wrote in both boots,
    # the guest left the file system clean, and the built image is untouched.
    r = subprocess.run([debugfs, "-R", "cat /var/lgj-persist", str(root)], capture_output=True, text=True)
    assert r.stdout == f"{token}\nafter-reboot {token}\n", r.stdout + r.stderr
    r = subprocess.run([e2fsck, "-fn", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _sha256(pristine) == pristine_sha
