"""Tests for the default guest: its build pieces (fast, no kernel build) and
a slow boot of the same guest under QEMU TCG when QEMU is installed.  The
end-to-end boot under lguest-jit is tests/test_boot_e2e.py."""
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # guest/ is a top-level package of the repo
    sys.path.insert(0, str(ROOT))

from guest import build, markers  # noqa: E402

BUSYBOX = next((p for p in build.BUSYBOX_CANDIDATES if p.is_file()), None)


def read_newc(data: bytes):
    """Independent newc reader: [(name, mode, nlink, rdev, data)] up to the trailer."""
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, nlink, size, rmaj, rmin, namesize = f[1], f[4], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        assert data[pos + namesize - 1] == 0
        pos = (pos + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, mode, nlink, (rmaj, rmin), body))


SAMPLE = [
    build.directory("bin"),
    build.regular("bin/tool", b"\x7fELF" + bytes(range(7)), 0o755),  # odd length: padding
    build.symlink("bin/sh", "tool"),
    build.directory("dev"),
    build.char_device("dev/console", 5, 1),
    build.regular("init", b"#!/bin/sh\necho hi\n", 0o755),
]


def test_newc_round_trip():
    arc = build.write_newc(SAMPLE)
    assert len(arc) % 4 == 0
    got = {name: (mode, nlink, rdev, body) for name, mode, nlink, rdev, body in read_newc(arc)}
    assert list(got) == ["bin", "bin/tool", "bin/sh", "dev", "dev/console", "init"]
    assert got["bin"][0] == stat.S_IFDIR | 0o755 and got["bin"][1] == 2
    assert got["bin/tool"] == (stat.S_IFREG | 0o755, 1, (0, 0), b"\x7fELF" + bytes(range(7)))
    assert got["bin/sh"][0] == stat.S_IFLNK | 0o777 and got["bin/sh"][3] == b"tool"
    assert got["dev/console"][0] == stat.S_IFCHR | 0o600 and got["dev/console"][2] == (5, 1)


def test_newc_is_reproducible_and_strips_slashes():
    a = build.write_newc([build.regular("/etc/x", b"1")])
    assert a == build.write_newc([build.regular("etc/x", b"1")])
    assert read_newc(a)[0][0] == "etc/x"


@pytest.mark.parametrize("entries", [
    [build.regular("a", b"")] * 2,                      # duplicate
    [build.regular("../escape", b"")],                   # leaves the root
    [build.CpioEntry("typeless", 0o644)],                # no S_IF* bits
    [build.CpioEntry("d", stat.S_IFDIR | 0o755, b"x")],  # data on a directory
])
def test_newc_rejects_bad_entries(entries):
    with pytest.raises(ValueError):
        build.write_newc(entries)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="Debian cpio not installed")
def test_gnu_cpio_reads_archive(tmp_path):
    arc = build.write_newc(SAMPLE)
    listing = subprocess.run(["cpio", "-t", "-v"], input=arc, capture_output=True, check=True)
    text = listing.stdout.decode()
    assert "bin/sh -> tool" in text
    assert re.search(r"^crw-------.*5,\s*1.*dev/console$", text, re.M)
    # Extract the non-device part and check contents and permissions.
    plain = build.write_newc([e for e in SAMPLE if not stat.S_ISCHR(e.mode)])
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
                   input=plain, cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755


def test_initramfs_layout():
    entries = build.initramfs_entries(b"BUSYBOX", b"#!/bin/sh\n")
    by_name = {e.name: e for e in entries}
    assert by_name["init"].mode == stat.S_IFREG | 0o755
    assert by_name["bin/busybox"].data == b"BUSYBOX"
    assert (by_name["dev/console"].rdev_major, by_name["dev/console"].rdev_minor) == (5, 1)
    for d in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(by_name[d].mode)
    for applet in ("sh", "mount", "dd", "ip", "ping", "poweroff", "awk", "od"):
        assert by_name[f"bin/{applet}"].data == b"busybox"


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_build_initramfs_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGUEST_JIT_CACHE", str(tmp_path))
    assert build.cached_initramfs() is None
    path = build.build_initramfs(log=lambda m: None)
    assert path.parent == tmp_path / "guest" / "initramfs"
    assert build.cached_initramfs() == path
    members = {name: (mode, body) for name, mode, _, _, body in read_newc(path.read_bytes())}
    assert members["init"] == (stat.S_IFREG | 0o755, build.INIT_SCRIPT.read_bytes())
    assert members["bin/busybox"][1] == BUSYBOX.read_bytes()
    # Building again reuses the file; no kernel means no guest yet.
    assert build.build_initramfs(log=lambda m: None) == path
    monkeypatch.setattr(build, "cached_kernel", lambda: None)
    assert build.cached_guest() is None


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_init_script_syntax():
    r = subprocess.run([str(BUSYBOX), "sh", "-n", str(build.INIT_SCRIPT)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_init_block_pattern_matches_host():
    # Run the awk program exactly as guest/init has it.
    m = re.search(r"awk -v n=[^\n]*? \\\n\s*'([^']*)'", build.INIT_SCRIPT.read_text())
    assert m, "block pattern generator not found in guest/init"
    r = subprocess.run([str(BUSYBOX), "awk", "-v", "n=300", m.group(1)],
                       capture_output=True, timeout=30, check=True)
    assert r.stdout == markers.block_pattern(300 * 16)


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_init_irqs_step_sums_every_cpu_column(tmp_path):
    """guest/init's check_irqs, run by busybox sh over a two-CPU
    /proc/interrupts: counts summed over the CPU columns, the CPUs that
    took a virtio MSI named, INTx lines kept apart."""
    fake = tmp_path / "interrupts"
    fake.write_text(
        "           CPU0       CPU1       \n"
        "  0:         45          0   IO-APIC   2-edge      timer\n"
        " 24:          0          0   PCI-MSI 16384-edge      virtio0-config\n"
        " 25:         12          3   PCI-MSI 16385-edge      virtio0-input.0\n"
        " 26:          0          7   PCI-MSI 16386-edge      virtio1-req.0\n"
        " 11:          9          5   XT-PIC   virtio2\n"
        "NMI:          0          0   Non-maskable interrupts\n")
    func = re.search(r"^check_irqs\(\) \{\n.*?^\}\n", build.INIT_SCRIPT.read_text(), re.S | re.M)
    assert func, "check_irqs not found in guest/init"
    script = ('step() { echo "$*"; }\n' + func.group(0).replace("/proc/interrupts", str(fake))
              + "check_irqs\n")
    r = subprocess.run([str(BUSYBOX), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[:2] == ["irqs", "OK"]
    assert dict(w.split("=", 1) for w in words[2:]) == {
        "msi": "3", "intx": "1", "msi_cpus": "0,1", "virtio0-config": "0", "virtio0-input.0": "15",
        "virtio1-req.0": "7", "virtio2": "14"}


def test_block_pattern():
    p = markers.block_pattern(4096)
    assert len(p) == 4096
    assert p[:16] == b"lgj-blk 0000000\n" and p[-16:] == b"lgj-blk 00000ff\n"
    with pytest.raises(ValueError):
        markers.block_pattern(100)


def test_parse_config_and_strictness():
    cfg = build.parse_config(
        "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=n\n\nCONFIG_HZ=100\n")
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": '"x y"',
                   "CONFIG_D": None, "CONFIG_HZ": "100"}
    with pytest.raises(ValueError, match="line 2"):
        build.parse_config("CONFIG_A=y\nVIRTIO_PCI=y\n", strict=True)


def test_merge_config_overrides_in_place_and_appends():
    base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_HZ=250\n# some comment\n"
    merged = build.merge_config(base, {"CONFIG_A": None, "CONFIG_B": "y",
                                       "CONFIG_HZ": "100", "CONFIG_NEW": "y"})
    assert merged.splitlines() == ["# CONFIG_A is not set", "CONFIG_B=y", "CONFIG_HZ=100",
                                   "# some comment", "CONFIG_NEW=y"]


def test_config_mismatches():
    want = {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": None, "CONFIG_HZ": "100"}
    final = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_HZ": "250"}  # C absent == unset
    assert build.config_mismatches(want, final) == [
        "CONFIG_B: wanted not set, got y", "CONFIG_HZ: wanted 100, got 250"]
    assert build.config_mismatches(want, {"CONFIG_A": "y", "CONFIG_HZ": "100"}) == []


def test_fragment_parses_and_requests_the_essentials():
    frag = build.parse_config(build.FRAGMENT.read_text(), strict=True)
    for name in ("64BIT", "PCI", "VIRTIO_PCI", "VIRTIO_CONSOLE", "VIRTIO_BLK", "VIRTIO_NET",
                 "HW_RANDOM_VIRTIO", "INET", "DEVTMPFS", "BLK_DEV_INITRD", "HZ_100",
                 "NO_HZ_IDLE", "KERNEL_LZ4"):
        assert frag[f"CONFIG_{name}"] == "y", name
    for name in ("PARAVIRT", "KVM_GUEST", "ACPI", "VT", "SERIO_I8042", "VIRTIO_PCI_LEGACY",
                 "CPU_SUP_AMD", "RD_GZIP"):
        assert frag[f"CONFIG_{name}"] is None, name


def test_kernel_key_tracks_fragment_and_source():
    k = build.kernel_key("CONFIG_A=y\n", "6.1.1-1")
    assert k == build.kernel_key("CONFIG_A=y\n", "6.1.1-1")
    assert k != build.kernel_key("CONFIG_A=y\nCONFIG_B=y\n", "6.1.1-1")
    assert k != build.kernel_key("CONFIG_A=y\n", "6.1.2-1")
    assert k != build.kernel_key("CONFIG_A=y\n", "6.1.1-1", "abc123")
    assert build.kernel_key("CONFIG_A=y\n", "6.1.1-1", "") == k    # no patches: key as before


def test_patches_are_listed_in_order_and_hashed(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "PATCH_DIR", tmp_path)
    assert build.kernel_patches() == [] and build._patches_digest([]) == ""
    (tmp_path / "0002-b.patch").write_text("b")
    (tmp_path / "0001-a.patch").write_text("a")
    (tmp_path / "notes.txt").write_text("not a patch")
    got = build.kernel_patches()
    assert [p.name for p in got] == ["0001-a.patch", "0002-b.patch"]
    d = build._patches_digest(got)
    (tmp_path / "0002-b.patch").write_text("b2")
    assert build._patches_digest(got) != d


def test_patched_files():
    text = ("--- a/arch/x86/mm/fault.c\t2024-01-01\n+++ b/arch/x86/mm/fault.c\t2024-01-02\n@@ -1 +1 @@\n"
            "--- a/README\n+++ b/README\n--- a/gone.c\n+++ /dev/null\n")
    assert build._patched_files(text) == ["arch/x86/mm/fault.c", "README"]


def test_syscall_patch_applies_to_the_installed_source(tmp_path):
    # The pristine tree only exists once a kernel was built on this machine.
    trees = [t for t in sorted((build.cache_dir() / "src").glob(f"{build.KERNEL_SOURCE_PACKAGE}_*"))
             if (t / "Makefile").is_file() and "+" not in t.name]       # pristine trees only
    if not trees or shutil.which("patch") is None:
        pytest.skip("no unpacked kernel source or no patch(1)")
    for patch in build.kernel_patches():
        for rel in build._patched_files(patch.read_text()):
            dst = tmp_path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trees[-1] / rel, dst)
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(tmp_path), "-i", str(patch)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    fault = (tmp_path / "arch/x86/mm/fault.c").read_text()
    assert "handle_syscall_fault(regs, address)" in fault
    assert '__setup("syscall_fault_entry"' in fault


def test_default_cmdline():
    line = build.default_cmdline("selftest", "hvc0")
    words = line.split()
    assert "console=hvc0" in words and "lguest_jit.workload=selftest" in words
    assert "noxsave" in words and "acpi=off" in words
    assert "syscall_fault_entry" in words          # patches/0001 is off without it
    assert "earlyprintk=serial" in build.default_cmdline(console="ttyS0").split()
    with pytest.raises(ValueError):
        build.default_cmdline("rm -rf /")


def test_parse_console_with_kernel_noise():
    text = (
        "[    1.0] Run /init as init process\r\n"
        "LGJ-INIT 1.50 6.1.192\n"
        "LGJ-STEP mount-proc OK 1.51 /proc\n"
        "LGJ-STEP console OK 1.60 active=hvc0 want=hvc0\n"
        "LGJ-STEP hw[    2.0] virtio_net virtio0: noise\n"
        "LGJ-STEP block OK 2.10 bytes=4096 sectors=2048 sha256=ab readback=ok\n"
        "xx LGJ-STEP ping FAIL 7.30 peer=10.0.2.2 rc=1\r\n"
        "LGJ-DONE selftest 7.40 ok=3 fail=1 skip=0\n"
    )
    rep = markers.parse_console(text.encode())
    assert rep.kernel == "6.1.192" and rep.init_uptime == 1.5
    assert [s.name for s in rep.steps] == ["mount-proc", "console", "block", "ping"]
    assert rep.step("block").fields()["sectors"] == "2048"
    assert rep.step("ping").detail == "peer=10.0.2.2 rc=1"
    assert [s.name for s in rep.failed] == ["ping"]
    assert rep.done and rep.workload == "selftest" and rep.counts == {"ok": 3, "fail": 1, "skip": 0}
    assert not markers.parse_console("LGJ-INIT 1.0 6.1\n").done


def test_cached_guest_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGUEST_JIT_CACHE", str(tmp_path))
    assert build.cache_dir() == tmp_path / "guest"
    assert build.cached_kernel() is None
    assert build.cached_guest() is None


def _e2fs(tool):
    return shutil.which(tool) or next((p for p in (f"/sbin/{tool}", f"/usr/sbin/{tool}") if os.path.exists(p)), None)


DEBUGFS, DUMPE2FS, E2FSCK = _e2fs("debugfs"), _e2fs("dumpe2fs"), _e2fs("e2fsck")


def debugfs(image, request: str) -> str:
    r = subprocess.run([DEBUGFS, "-R", request, str(image)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(BUSYBOX is None or None in (DEBUGFS, DUMPE2FS, E2FSCK),
                    reason="needs busybox-static and e2fsprogs")
def test_build_rootfs_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGUEST_JIT_CACHE", str(tmp_path))
    assert build.cached_rootfs() is None
    img = build.build_rootfs(log=lambda m: None)
    assert img.parent == tmp_path / "guest" / "rootfs" and build.cached_rootfs() == img
    assert img.stat().st_size == build.ROOTFS_MIB << 20
    # The kernel finds /sbin/init; busybox and its applets are there.
    assert debugfs(img, "cat /sbin/init") == build.INIT_SCRIPT.read_text()
    r = subprocess.run([DEBUGFS, "-R", "cat /bin/busybox", str(img)], capture_output=True, timeout=60)
    assert r.stdout == BUSYBOX.read_bytes()
    ls = debugfs(img, "ls -l /bin")
    for applet in ("sh", "mount", "dd", "reboot", "poweroff"):
        assert re.search(rf"\b120777\b.*\s{re.escape(applet)}\s*$", ls, re.M), (applet, ls)
    for d in ("dev", "proc", "sys", "tmp", "var", "etc"):
        assert "Type: directory" in debugfs(img, f"stat /{d}")
    # Every inode is root's, whoever built it (the stager's uid is rewritten).
    for path in ("/", "/sbin/init", "/bin/busybox", "/bin/sh", "/var"):
        st = debugfs(img, f"stat {path}")
        assert re.search(r"User:\s+0\s+Group:\s+0\b", st), (path, st)
    # The features mke2fs enables by default, 4 KiB blocks, inode tables
    # already zeroed (no lazy init in the guest), clean.
    r = subprocess.run([DUMPE2FS, "-h", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    head = r.stdout
    features = set(re.search(r"Filesystem features:\s+(.*)", head).group(1).split())
    assert {"has_journal", "extent", "64bit", "flex_bg", "metadata_csum", "huge_file", "dir_nlink",
            "extra_isize"} <= features
    assert re.search(r"Block size:\s+4096", head) and re.search(r"Filesystem state:\s+clean", head)
    groups = subprocess.run([DUMPE2FS, str(img)], capture_output=True, text=True).stdout
    assert "ITABLE_ZEROED" in groups
    r = subprocess.run([E2FSCK, "-fn", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # Cached: built once.
    assert build.build_rootfs(log=lambda m: 1 / 0) == img


def test_rootfs_tree_moves_init_and_has_no_device_nodes():
    entries = build.rootfs_tree(b"BUSYBOX", b"#!/bin/sh\n")
    by_name = {e.name: e for e in entries}
    assert by_name["sbin/init"].mode == stat.S_IFREG | 0o755 and by_name["sbin/init"].data == b"#!/bin/sh\n"
    assert "init" not in by_name
    assert not any(stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode) for e in entries)


def test_software_kvm_words_only_where_asked_or_detected(monkeypatch):
    """The boot-time cuts for emulated guest kernels are added on a software
    KVM (or when asked) and never on hardware KVM (or when turned off)."""
    from lguest_jit.hw import hosts
    cuts = build.SOFTWARE_KVM_CMDLINE.split()
    assert set(cuts) <= set(build.default_cmdline(host_tuning=True).split())
    assert not set(cuts) & set(build.default_cmdline(host_tuning=False).split())
    monkeypatch.setattr(hosts, "software_kvm", lambda: "kvm_pvm (test)")
    assert set(cuts) <= set(build.default_cmdline().split())
    monkeypatch.setattr(hosts, "software_kvm", lambda: None)
    assert not set(cuts) & set(build.default_cmdline().split())


def test_default_cmdline_for_a_root_disk():
    words = build.default_cmdline("persist", "hvc0", root="/dev/vda").split()
    assert {"root=/dev/vda", "rootfstype=ext4", "rw", "lguest_jit.workload=persist"} <= set(words)
    assert not any(w.startswith("root=") for w in build.default_cmdline().split())
    with pytest.raises(ValueError):
        build.default_cmdline(root="/dev/vda init=/bin/sh")


def test_parse_boots_splits_at_each_init():
    text = ("LGJ-INIT 1.0 6.1\nLGJ-STEP persist OK 2.0 wrote=lgj-1 boot=1\nLGJ-REBOOT persist 2.1\n"
            "[ 0.0] Linux version 6.1\nLGJ-INIT 1.1 6.1\nLGJ-STEP persist OK 1.5 found=lgj-1 boot=2\n"
            "LGJ-DONE persist 1.6 ok=1 fail=0 skip=0\n")
    first, second = markers.parse_boots(text)
    assert first.rebooted and not first.done and first.step("persist").fields()["wrote"] == "lgj-1"
    assert second.done and not second.rebooted and second.step("persist").fields()["found"] == "lgj-1"
    assert markers.parse_boots("no markers at all\n") == []


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_missing_packages_asks_dpkg():
    # dpkg is always installed on Debian; the second name cannot exist.
    assert build.missing_packages(("dpkg", "lgj-no-such-package-x")) == ["lgj-no-such-package-x"]


@pytest.mark.slow
def test_default_guest_boots_under_qemu_tcg(tmp_path):
    """The same kernel, patch and command line on an architecturally exact
    CPU (QEMU's TCG): SYSCALL works natively there, so syscall_fault_entry
    must change nothing.  Needs the bzImage (python -m guest.build --bzimage)."""
    qemu = shutil.which("qemu-system-x86_64")
    vmlinux = build.cached_kernel()
    if qemu is None or vmlinux is None or not (vmlinux.parent / "bzImage").is_file():
        pytest.skip("needs qemu-system-x86_64 and a cached bzImage (guest.build --bzimage)")
    initrd = build.cached_initramfs()
    if initrd is None:
        pytest.skip("initramfs not built")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    cmd = [qemu, "-accel", "tcg", "-m", "128", "-kernel", str(vmlinux.parent / "bzImage"), "-initrd", str(initrd),
           "-append", build.default_cmdline("selftest", "ttyS0"), "-nographic", "-no-reboot", "-monitor", "none",
           "-serial", "stdio", "-display", "none",
           "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
           "-device", "virtio-rng-pci,disable-legacy=on"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = b""
    timer = threading.Timer(180, proc.kill)      # a hung guest fails the test instead of hanging it
    timer.start()
    try:
        for line in proc.stdout:                 # QEMU idles after the halt: stop at LGJ-DONE
            out += line
            if b"LGJ-DONE" in line or b"Kernel panic" in line:
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    rep = markers.parse_console(out)
    assert rep.done and rep.counts["fail"] == 0, out[-3000:].decode(errors="replace")
    assert rep.step("block").status == "OK" and rep.step("hwrng").status == "OK"
    assert disk.read_bytes()[:4096] == markers.block_pattern(4096)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_exec_tls_reproducer_builds_and_is_clean_on_the_host(tmp_path):
    """guest/diag/exec_tls.c (README "Pipelines") must build static and find
    nothing wrong on a sane machine, or it proves nothing in a guest."""
    exe = tmp_path / "exec_tls"
    r = subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(ROOT / "guest/diag/exec_tls.c")],
                       capture_output=True, text=True)
    if r.returncode != 0 and "cannot find -lc" in r.stderr:
        pytest.skip("no static C library")
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe), "5", "4"], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "EXEC_TLS total=20 crashes=0 bad=0"
