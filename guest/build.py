"""Build the default guest: a small Linux from Debian's linux-source and a
busybox initramfs.

    python -m guest.build [--force] [--bzimage] [--no-apt] [--json]

The kernel is `make tinyconfig` + guest/kernel.config + `make olddefconfig`,
built once per (fragment, kernel source version) and cached; the initramfs is
an uncompressed newc cpio written here (no cpio tool), cached per content;
the root-disk image is ext4 made by `mke2fs -d` from a staged directory (no
root privileges needed), cached per content.  Standard output carries only
the result: the vmlinux, initramfs and rootfs paths, one a line (or one JSON
object with --json); everything else, tools' output included, goes to
standard error or to log files in the cache.

Cache root: $LGUEST_JIT_CACHE (default ~/.cache/lguest-jit); this module uses
its guest/ subdirectory.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAGMENT = HERE / "kernel.config"
# Source patches, applied in name order with `patch -p1` (guest/README.md
# says why each exists).
PATCH_DIR = HERE / "patches"
INIT_SCRIPT = HERE / "init"
# The `bench` workload (sourced by /init from /lib/lgj/bench.sh) and its
# random-read tool, compiled here without a C library (guest/randread.c).
BENCH_SCRIPT = HERE / "bench.sh"
RANDREAD_SOURCE = HERE / "randread.c"
RANDREAD_CFLAGS = ("-static", "-nostdlib", "-O2", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
                   "-fno-stack-protector", "-fno-pie", "-no-pie", "-fno-asynchronous-unwind-tables",
                   "-Wl,--build-id=none", "-s")

KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# Debian packages the build needs.  libssl-dev/xz-utils: certificate and
# tarball tooling used by the kernel build; busybox-static: the userland.
APT_PACKAGES = (
    KERNEL_SOURCE_PACKAGE, "build-essential", "bc", "flex", "bison",
    "libelf-dev", "libssl-dev", "xz-utils", "busybox-static", "patch",
    # mke2fs -d and debugfs: the root-disk image (and the tests read it back).
    "e2fsprogs",
)
# What --bzimage's other VMM needs to boot it: QEMU, which `lguest-jit bench
# boot` and `bench guest` run beside lguest-jit on the same kernel.
OTHER_VMM_PACKAGES = ("qemu-system-x86",)
# Packages to treat as missing even when installed (space-separated), so
# that the apt-get step really runs: how the tests meet the build the way a
# fresh machine does without uninstalling anything.  apt-get reinstalls them.
ASSUME_MISSING_ENV = "LGUEST_JIT_APT_ASSUME_MISSING"
# Child processes write their chatter here (never to stdout: see main()).
STDERR_FD = 2
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# Bump when the build recipe changes in a way that changes the output.
RECIPE_VERSION = "1"

# Applets linked into /bin: what /init uses plus a small interactive kit.
# Each cpio entry costs emulated kernel work at unpack time, so not all 300.
APPLETS = (
    "sh", "ash", "mount", "umount", "mkdir", "cat", "echo", "printf", "ls",
    "readlink", "od", "hexdump", "head", "tail", "tr", "awk", "sed", "grep",
    "wc", "dd", "sync", "blockdev", "sha256sum", "timeout", "sleep", "ip",
    "ifconfig", "ping", "poweroff", "reboot", "setsid", "cttyhack", "uname",
    "dmesg", "ps", "kill", "free", "stat", "cp", "mv", "rm", "ln", "test", "taskset", "nproc",
    "[", "true", "false", "env", "seq", "cut", "xxd", "uptime", "vi", "less",
    "nc", "md5sum",
)

# Command line for the guest under our KVM (see guest/README.md for why).
# clearcpuid names CPU features whose kernel code paths use instructions
# KVM's emulator lacks: clac/stac (smap), cmpxchg16b (cx16), rdrand/rdseed
# (random init), popcnt (hweight via alternatives), rd/wrfsbase (context
# switch), invpcid (TLB flush).  syscall_fault_entry enables
# patches/0001-x86-syscall-fault-entry.patch: kvm_pvm leaves a SYSCALL from
# guest user mode in user mode at MSR_LSTAR (guest/README.md).  Boot time,
# measured: rodata=off skips write-protecting the kernel image and freeing
# the gaps (page-table splitting, ~5 s emulated); pci=noearly skips the
# early chipset quirks, a conf1 scan of every slot (~1.5 s of port exits).
# noapic: the launcher's MP table (lguest_jit/hw/firmware.py) has no I/O
# APIC; interrupts stay on the PIC through LINT0, which Linux sets to ExtINT
# only with I/O APIC set-up off.
BASE_CMDLINE = (
    "acpi=off nokaslr panic=-1 noxsave tsc=reliable mitigations=off noapic "
    "clearcpuid=smap,cx16,rdrand,rdseed,popcnt,fsgsbase,invpcid,pcid "
    "syscall_fault_entry rodata=off pci=noearly"
)

# Added only where guest kernel code is emulated (lguest_jit.hw.hosts.
# software_kvm), measured on a 1-vCPU boot of the default (SMP) kernel:
# percpu_alloc=page: the default "embed" first chunk takes a 2 MiB unit per
#   CPU and zeroes it whole, byte by byte in the emulator (~1.1 s); page-
#   sized units zero only the 160 KiB in use.
# noreplace-smp: an SMP kernel that finds one CPU rewrites every lock prefix
#   through text_poke, a temporary mm and a TLB flush per site (~1.2 s).
# On hardware KVM both would cost a little at run time (per-CPU data off its
# large page, locked atomics on one CPU) to save milliseconds at boot.
SOFTWARE_KVM_CMDLINE = "percpu_alloc=page noreplace-smp"


# --------------------------------------------------------------------------
# cache layout
# --------------------------------------------------------------------------

def cache_root() -> Path:
    """$LGUEST_JIT_CACHE, default ~/.cache/lguest-jit."""
    root = os.environ.get("LGUEST_JIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lguest-jit"


def cache_dir() -> Path:
    """The guest cache directory ($LGUEST_JIT_CACHE/guest)."""
    return cache_root() / "guest"


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise builds between processes sharing one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(dst: Path, data: bytes) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------
# Kconfig fragments
# --------------------------------------------------------------------------

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str, *, strict: bool = False) -> dict[str, str | None]:
    """Map CONFIG_NAME -> value ('y', 'm', '100', '"str"') or None for
    "is not set".  Other comments and blank lines are skipped; with
    strict=True (fragments) any other line is a ValueError."""
    out: dict[str, str | None] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = _SET_RE.match(line)
        if m:
            value = m.group(2)
            out[m.group(1)] = None if value == "n" else value
            continue
        m = _UNSET_RE.match(line)
        if m:
            out[m.group(1)] = None
            continue
        if strict and line and not line.startswith("#"):
            raise ValueError(f"line {lineno}: not a Kconfig assignment: {raw!r}")
    return out


def _config_line(name: str, value: str | None) -> str:
    return f"# {name} is not set" if value is None else f"{name}={value}"


def merge_config(base_text: str, fragment: dict[str, str | None]) -> str:
    """The base .config with every fragment option overriding it in place
    (or appended); olddefconfig resolves dependencies afterwards."""
    pending = dict(fragment)
    lines = []
    for raw in base_text.splitlines():
        line = raw.strip()
        m = _SET_RE.match(line) or _UNSET_RE.match(line)
        if m and m.group(1) in pending:
            name = m.group(1)
            lines.append(_config_line(name, pending.pop(name)))
        else:
            lines.append(raw)
    lines.extend(_config_line(n, v) for n, v in pending.items())
    return "\n".join(lines) + "\n"


def config_mismatches(fragment: dict[str, str | None],
                      final: dict[str, str | None]) -> list[str]:
    """Options whose final value differs from the fragment's request, as
    'CONFIG_X: wanted y, got not set' strings (empty when all held)."""
    def show(v):
        return "not set" if v is None else v
    bad = []
    for name, want in fragment.items():
        got = final.get(name)
        if got != want:
            bad.append(f"{name}: wanted {show(want)}, got {show(got)}")
    return bad


# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------

def missing_packages(packages=APT_PACKAGES) -> list[str]:
    """Packages from `packages` that dpkg does not report installed."""
    missing = []
    for pkg in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                           capture_output=True, text=True)
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            missing.append(pkg)
    return missing


def ensure_packages(packages=APT_PACKAGES, log=print) -> None:
    """apt-get install whatever is missing; does nothing when all present.
    apt-get's own output goes to $cache/guest/apt.log, never to stdout."""
    missing = missing_packages(packages)
    forced = [p for p in os.environ.get(ASSUME_MISSING_ENV, "").split() if p not in missing]
    if not missing and not forced:
        return
    if os.geteuid() != 0:
        raise RuntimeError("missing Debian packages (run as root or install): "
                           + " ".join(missing + forced))
    logpath = cache_dir() / "apt.log"
    logpath.parent.mkdir(parents=True, exist_ok=True)
    log(f"guest: installing {' '.join(missing + forced)} (log: {logpath})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Lock timeout: wait for another apt/dpkg run (a second build, the
    # system's own updates) instead of failing at once.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends"]
    with open(logpath, "w") as logfile, _progress("apt-get install"):
        def apt(*argv):
            return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                  stderr=subprocess.STDOUT).returncode == 0
        ok = True
        if missing:
            ok = apt(*install, *missing)
        if ok and forced:
            ok = apt(*install, "--reinstall", *forced)
        if not ok:
            # A fresh machine has no package lists yet.
            ok = apt("apt-get", "update") and apt(*install, *missing) and \
                (not forced or apt(*install, "--reinstall", *forced))
    if not ok:
        raise RuntimeError(f"apt-get install failed: {_last_line(logpath)} (log: {logpath})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def _progress(what: str):
    """While a long step runs: a live "what  0:01:23" line on stderr when
    stderr is a terminal (rich); nothing at all otherwise."""
    try:
        if not sys.stderr.isatty():
            raise ImportError
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("guest: {task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        bar.add_task(what, total=None)
        yield


def kernel_source_version() -> str:
    """The installed linux-source package version (part of the cache key)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", KERNEL_SOURCE_PACKAGE],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"{KERNEL_SOURCE_PACKAGE} is not installed")
    return r.stdout.strip()


def find_busybox() -> Path:
    """The static busybox binary (busybox-static's /bin/busybox)."""
    for p in BUSYBOX_CANDIDATES:
        if p.is_file():
            if not _is_static_elf(p.read_bytes()):
                raise RuntimeError(f"{p} is dynamically linked: install busybox-static")
            return p
    raise RuntimeError("no busybox found: install busybox-static")


def _is_static_elf(data: bytes) -> bool:
    from elftools.elf.elffile import ELFFile
    elf = ELFFile(io.BytesIO(data))
    return not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())


# --------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------

def kernel_patches() -> list[Path]:
    """guest/patches/*.patch in the order they are applied."""
    return sorted(PATCH_DIR.glob("*.patch")) if PATCH_DIR.is_dir() else []


def _patches_digest(patches) -> str:
    """Hash of the patch names and contents ("" when there are none)."""
    if not patches:
        return ""
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def kernel_key(fragment_text: str, source_version: str, patches_digest: str = "") -> str:
    h = hashlib.sha256()
    parts = (RECIPE_VERSION, source_version, fragment_text)
    if patches_digest:      # keeps keys of unpatched recipes unchanged
        parts += (patches_digest,)
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _current_kernel_key() -> str:
    return kernel_key(FRAGMENT.read_text(), kernel_source_version(), _patches_digest(kernel_patches()))


def _kernel_dir(key: str) -> Path:
    return cache_dir() / "kernels" / key


def _patched_files(patch_text: str) -> list[str]:
    """Paths (relative to the tree, -p1) a unified diff modifies."""
    out = []
    for line in patch_text.splitlines():
        if line.startswith("+++ "):
            name = line[4:].split("\t")[0].strip()
            if name != "/dev/null":
                out.append(name.split("/", 1)[1])
    return out


def _source_tree(version: str, log=print) -> Path:
    """The kernel source for `version` with guest/patches applied.  The
    pristine tree is unpacked once per package version; a patched tree is a
    hard-linked copy of it (each patched file gets its own inode first, so
    the pristine tree never changes), one per patch set."""
    pristine = _pristine_tree(version, log)
    patches = kernel_patches()
    if not patches:
        return pristine
    src = pristine.with_name(f"{pristine.name}+p{_patches_digest(patches)}")
    if (src / ".lgj-patched").is_file():
        return src
    tmp = src.with_name(src.name + ".patching")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-al", str(pristine), str(tmp)], check=True)
    for patch in patches:
        text = patch.read_text()
        for rel in _patched_files(text):
            f = tmp / rel
            if f.is_file():   # break the hard link before patch edits it
                shutil.copy2(f, f.with_name(f.name + ".lgj-unlink"))
                os.replace(f.with_name(f.name + ".lgj-unlink"), f)
        log(f"guest: applying {patch.name}")
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(tmp), "-i", str(patch)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{patch.name} does not apply to {KERNEL_SOURCE_PACKAGE} {version}:\n"
                               + r.stdout + r.stderr)
    (tmp / ".lgj-patched").write_text("".join(p.name + "\n" for p in patches))
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    return src


def _pristine_tree(version: str, log=print) -> Path:
    """Unpack the linux-source tarball once per package version."""
    src = cache_dir() / "src" / f"{KERNEL_SOURCE_PACKAGE}_{version}"
    if (src / "Makefile").is_file():
        return src
    tmp = src.with_name(src.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"guest: unpacking {KERNEL_TARBALL} into {src}")
    with _progress("unpacking the kernel source"):
        subprocess.run(["tar", "-xf", str(KERNEL_TARBALL), "-C", str(tmp)], check=True,
                       stdout=STDERR_FD)
    (inner,) = [p for p in tmp.iterdir() if p.is_dir()]
    shutil.rmtree(src, ignore_errors=True)
    os.replace(inner, src)
    shutil.rmtree(tmp, ignore_errors=True)
    return src


def _make(src: Path, out: Path, *targets: str, logfile=None, jobs: int | None = None):
    cmd = ["nice", "-n", "10", "make", "-C", str(src), f"O={out}"]
    if jobs:
        cmd.append(f"-j{jobs}")
    cmd.extend(targets)
    with _progress(f"make {' '.join(targets)}"):
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=logfile or STDERR_FD,
                           stderr=subprocess.STDOUT if logfile else None)
    if r.returncode != 0:
        where = f" (log: {logfile.name})" if logfile else ""
        raise RuntimeError(f"make {' '.join(targets)} failed{where}")


def configure_kernel(src: Path, out: Path, fragment_text: str, logfile=None) -> list[str]:
    """tinyconfig, merge the fragment, olddefconfig; returns mismatches."""
    fragment = parse_config(fragment_text, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    _make(src, out, "tinyconfig", logfile=logfile)
    dotconfig = out / ".config"
    dotconfig.write_text(merge_config(dotconfig.read_text(), fragment))
    _make(src, out, "olddefconfig", logfile=logfile)
    return config_mismatches(fragment, parse_config(dotconfig.read_text()))


def cached_kernel() -> Path | None:
    """The cached vmlinux for the current fragment and source, or None."""
    try:
        key = _current_kernel_key()
    except RuntimeError:
        return None
    vmlinux = _kernel_dir(key) / "vmlinux"
    return vmlinux if vmlinux.is_file() else None


def build_kernel(*, force: bool = False, bzimage: bool = False,
                 jobs: int | None = None, log=print) -> Path:
    """Build (or reuse) the vmlinux for guest/kernel.config; returns its path.
    With bzimage=True also keep an arch/x86/boot/bzImage next to it."""
    fragment_text = FRAGMENT.read_text()
    version = kernel_source_version()
    key = _current_kernel_key()
    kdir = _kernel_dir(key)
    vmlinux = kdir / "vmlinux"
    # vmlinux is copied in last and atomically: a cached kernel needs no lock,
    # so a run never waits for another configuration's build.
    if vmlinux.is_file() and not force and (not bzimage or (kdir / "bzImage").is_file()):
        return vmlinux
    with _locked(cache_dir() / "build.lock"):
        if vmlinux.is_file() and not force and (not bzimage or (kdir / "bzImage").is_file()):
            return vmlinux
        src = _source_tree(version, log)
        out = cache_dir() / "build" / key
        kdir.mkdir(parents=True, exist_ok=True)
        logpath = kdir / "build.log"
        with open(logpath, "w") as logfile:
            log(f"guest: configuring kernel {key} (log: {logpath})")
            bad = configure_kernel(src, out, fragment_text, logfile)
            if bad:
                log("guest: WARNING: these guest/kernel.config options did not "
                    "survive olddefconfig:\n  " + "\n  ".join(bad))
            (kdir / "mismatches.txt").write_text("".join(b + "\n" for b in bad))
            targets = ["vmlinux"] + (["bzImage"] if bzimage else [])
            jobs = jobs or os.cpu_count() or 1
            log(f"guest: make -j{jobs} {' '.join(targets)} (several minutes)")
            _make(src, out, *targets, logfile=logfile, jobs=jobs)
        _atomic_copy(out / ".config", kdir / "config")
        if bzimage:
            _atomic_copy(out / "arch/x86/boot/bzImage", kdir / "bzImage")
        _atomic_copy(out / "vmlinux", vmlinux)  # last: its presence means done
        return vmlinux


# --------------------------------------------------------------------------
# initramfs: newc cpio (Documentation/driver-api/early-userspace/buffer-format.rst)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CpioEntry:
    """One archive member.  mode carries the file type bits (stat.S_IF*);
    data is file contents or, for a symlink, the target path."""
    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> int:
    return (-n) & 3


def _newc_header(ino, mode, uid, gid, nlink, mtime, size, rmaj, rmin, namesize) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rmaj, rmin, namesize, 0)
    for f in fields:
        if not 0 <= f <= 0xFFFFFFFF:
            raise ValueError(f"cpio field out of range: {f}")
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def write_newc(entries, mtime: int = 0) -> bytes:
    """Serialise entries as an uncompressed newc ("070701") cpio archive
    ending in the TRAILER!!! record.  Fixed mtime keeps it reproducible."""
    buf = io.BytesIO()
    seen = set()

    def emit(ino, entry: CpioEntry, nlink: int):
        name = entry.name.encode() + b"\0"
        buf.write(_newc_header(ino, entry.mode, entry.uid, entry.gid, nlink, mtime,
                               len(entry.data), entry.rdev_major, entry.rdev_minor,
                               len(name)))
        buf.write(name + b"\0" * _pad4(110 + len(name)))
        buf.write(entry.data + b"\0" * _pad4(len(entry.data)))

    for ino, entry in enumerate(entries, 1):
        name = entry.name.strip("/")
        if not name or name in seen or ".." in name.split("/"):
            raise ValueError(f"bad or duplicate cpio name: {entry.name!r}")
        seen.add(name)
        if stat.S_IFMT(entry.mode) == 0:
            raise ValueError(f"{name}: mode has no file type bits")
        if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
            raise ValueError(f"{name}: only files and symlinks carry data")
        emit(ino, CpioEntry(name, entry.mode, entry.data, entry.rdev_major,
                            entry.rdev_minor, entry.uid, entry.gid),
             2 if stat.S_ISDIR(entry.mode) else 1)
    emit(0, CpioEntry("TRAILER!!!", 0), 1)
    return buf.getvalue()


# Guest tools built from source (guest/tools/NAME.c -> /bin/NAME): what
# busybox lacks, e.g. AF_VSOCK.  Static, so the guest needs no libc.
TOOLS_DIR = Path(__file__).resolve().parent / "tools"


def tool_sources() -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(TOOLS_DIR.glob("*.c"))}


def _tools_digest() -> bytes:
    h = hashlib.sha256()
    for name, src in tool_sources().items():
        h.update(name.encode() + b"\0" + hashlib.sha256(src).digest())
    return h.digest()


def tool_entries(log=print) -> list[CpioEntry]:
    """Each guest tool compiled (cc -static), cached by its source's hash."""
    out = []
    for name, src in tool_sources().items():
        binary = cache_dir() / "tools" / f"{name}-{hashlib.sha256(src).hexdigest()[:16]}"
        if not binary.is_file():
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_suffix(f".tmp{os.getpid()}")
            r = subprocess.run(["cc", "-static", "-Os", "-s", "-Wall", "-o", str(tmp), str(TOOLS_DIR / f"{name}.c")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"guest tool {name}: cc failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            os.replace(tmp, binary)
            log(f"guest: built tool {name} ({binary.stat().st_size} bytes)")
        out.append(regular(f"bin/{name}", binary.read_bytes(), 0o755))
    return out


def initramfs_entries(busybox: bytes, init_script: bytes, applets=APPLETS, extra=()) -> list[CpioEntry]:
    """The guest's root filesystem: busybox, its applet links, /init and
    ``extra`` entries (``workload_entries()``: the bench workload)."""
    entries = [directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "root", "etc")]
    # The kernel opens /dev/console before /init runs and before anything
    # mounts devtmpfs, so the node must be in the archive.
    entries.append(char_device("dev/console", 5, 1))
    entries.append(regular("bin/busybox", busybox, 0o755))
    entries.extend(symlink(f"bin/{a}", "busybox") for a in applets)
    entries.append(regular("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(regular("etc/group", b"root:x:0:\n"))
    entries.append(regular("init", init_script, 0o755))
    entries.extend(extra)
    return entries


def _workload_key() -> bytes:
    """What the workload files are made from (part of the image keys)."""
    return hashlib.sha256(BENCH_SCRIPT.read_bytes() + b"\0" + RANDREAD_SOURCE.read_bytes() + b"\0"
                          + " ".join(RANDREAD_CFLAGS).encode()).digest()


def compile_randread(log=print) -> bytes:
    """guest/randread.c as a static binary, compiled once per source (cached)."""
    out = cache_dir() / "tools" / f"lgj-randread-{_workload_key().hex()[:16]}"
    if out.is_file():
        return out.read_bytes()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler for guest/randread.c: install build-essential")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    r = subprocess.run([cc, *RANDREAD_CFLAGS, "-o", str(tmp), str(RANDREAD_SOURCE)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling {RANDREAD_SOURCE.name} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    os.replace(tmp, out)
    log(f"guest: compiled {out}")
    return out.read_bytes()


def workload_entries(log=print) -> list[CpioEntry]:
    """Files of the workloads beyond /init: the bench script and its tool."""
    return [directory("lib"), directory("lib/lgj"),
            regular("lib/lgj/bench.sh", BENCH_SCRIPT.read_bytes()),
            regular("bin/lgj-randread", compile_randread(log), 0o755)]


def _busybox_applets(busybox: Path) -> set[str] | None:
    try:
        r = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(r.stdout.split()) if r.returncode == 0 else None


def cached_initramfs() -> Path | None:
    try:
        key = _initramfs_key(find_busybox().read_bytes(), INIT_SCRIPT.read_bytes())
    except RuntimeError:
        return None
    p = cache_dir() / "initramfs" / f"initramfs-{key}.cpio"
    return p if p.is_file() else None


def _initramfs_key(busybox: bytes, init_script: bytes) -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION.encode(), busybox, init_script, "\n".join(APPLETS).encode(), _workload_key(),
                 _tools_digest()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build_initramfs(*, force: bool = False, log=print) -> Path:
    """Write (or reuse) the uncompressed initramfs; returns its path."""
    bb_path = find_busybox()
    busybox = bb_path.read_bytes()
    init_script = INIT_SCRIPT.read_bytes()
    out = cache_dir() / "initramfs" / f"initramfs-{_initramfs_key(busybox, init_script)}.cpio"
    if out.is_file() and not force:
        return out
    available = _busybox_applets(bb_path)
    if available is not None:
        absent = [a for a in APPLETS if a not in available]
        if absent:
            raise RuntimeError(f"{bb_path} lacks applets: {' '.join(absent)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = workload_entries(log) + tool_entries(log)
    _atomic_write(out, write_newc(initramfs_entries(busybox, init_script, extra=extra)))
    log(f"guest: wrote {out} ({out.stat().st_size} bytes)")
    return out


# --------------------------------------------------------------------------
# root-disk image: ext4 from a staged tree (mke2fs -d), no root privileges
# --------------------------------------------------------------------------

# Bump when the image's layout changes (not RECIPE_VERSION: that is part of
# the kernel's cache key too, and would rebuild the kernel).
ROOTFS_VERSION = "1"
ROOTFS_MIB = 64
ROOTFS_LABEL = "lgj-root"
# Features: mke2fs's defaults for ext4 from /etc/mke2fs.conf, which the
# kernel supports (kernel.config).  -T default: 4 KiB blocks (mke2fs picks
# 1 KiB for a disk this small: four times the block and buffer-head work
# per page in the emulated kernel).  Zero the inode tables and the journal
# now, on the host, so the guest kernel starts no ext4lazyinit thread
# (emulated zeroing); no blocks reserved for root on a 64 MiB disk.
MKE2FS_OPTIONS = ("-t", "ext4", "-T", "default", "-L", ROOTFS_LABEL, "-m", "0",
                  "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0")


def rootfs_tree(busybox: bytes, init_script: bytes, applets=APPLETS, extra=()) -> list[CpioEntry]:
    """The root disk's files: the initramfs's tree with /init moved to
    /sbin/init (where the kernel looks without an initramfs).  No device
    nodes (making them needs root): the kernel mounts devtmpfs on /dev
    before it starts init (CONFIG_DEVTMPFS_MOUNT)."""
    entries = [e for e in initramfs_entries(busybox, init_script, applets, extra)
               if e.name not in ("init", "dev/console")]
    entries += [directory("sbin"), directory("var"), directory("mnt"),
                regular("sbin/init", init_script, 0o755)]
    return entries


def _stage(entries, root: Path) -> None:
    for e in entries:
        path = root / e.name
        if stat.S_ISDIR(e.mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            path.symlink_to(e.data.decode())
        elif stat.S_ISREG(e.mode):
            path.write_bytes(e.data)
        else:
            raise ValueError(f"{e.name}: only directories, files and symlinks on the root disk")
        if not stat.S_ISLNK(e.mode):
            path.chmod(stat.S_IMODE(e.mode))


def _e2fs_tool(name: str) -> str:
    for cand in (shutil.which(name), f"/sbin/{name}", f"/usr/sbin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(f"{name} not found: install e2fsprogs")


def make_ext4_image(entries, image: Path, size_mib: int = ROOTFS_MIB) -> None:
    """Write an ext4 image of `entries` (CpioEntry list) to `image`, as any
    user: mke2fs -d copies a staged tree, then debugfs makes every inode
    root's (mke2fs keeps the stager's uid/gid)."""
    import tempfile
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=image.parent, prefix=".stage-") as d:
        stage = Path(d) / "root"
        stage.mkdir()
        _stage(entries, stage)
        tmp = image.with_name(image.name + ".tmp")
        with open(tmp, "wb") as f:
            f.truncate(size_mib << 20)
        r = subprocess.run([_e2fs_tool("mke2fs"), "-q", "-F", *MKE2FS_OPTIONS, "-d", str(stage), str(tmp)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mke2fs failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        names = sorted({"/" + e.name.strip("/") for e in entries})
        cmds = "".join(f'sif "{n}" {field} 0\n' for n in names for field in ("uid", "gid"))
        r = subprocess.run([_e2fs_tool("debugfs"), "-w", "-f", "-", str(tmp)], input=cmds,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"debugfs failed: {r.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, image)


def _rootfs_key(busybox: bytes, init_script: bytes) -> str:
    h = hashlib.sha256()
    for part in (ROOTFS_VERSION.encode(), busybox, init_script, "\n".join(APPLETS).encode(),
                 str(ROOTFS_MIB).encode(), " ".join(MKE2FS_OPTIONS).encode(), _workload_key(), _tools_digest()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _rootfs_path(busybox: bytes, init_script: bytes) -> Path:
    return cache_dir() / "rootfs" / f"rootfs-{_rootfs_key(busybox, init_script)}.img"


def cached_rootfs() -> Path | None:
    """The pristine root-disk image if built, else None.  Boot a copy of
    it (it is shared by everything using this cache)."""
    try:
        p = _rootfs_path(find_busybox().read_bytes(), INIT_SCRIPT.read_bytes())
    except RuntimeError:
        return None
    return p if p.is_file() else None


def build_rootfs(*, force: bool = False, log=print) -> Path:
    """Write (or reuse) the pristine root-disk image; returns its path."""
    busybox = find_busybox().read_bytes()
    init_script = INIT_SCRIPT.read_bytes()
    out = _rootfs_path(busybox, init_script)
    if out.is_file() and not force:
        return out
    with _locked(cache_dir() / "rootfs.lock"):
        if not out.is_file() or force:
            extra = workload_entries(log) + tool_entries(log)
            make_ext4_image(rootfs_tree(busybox, init_script, extra=extra), out)
            log(f"guest: wrote {out} (ext4, {ROOTFS_MIB} MiB)")
    return out


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------

def default_cmdline(workload: str = "selftest", console: str = "hvc0",
                    extra: str = "", root: str | None = None, host_tuning: bool | None = None) -> str:
    """Kernel command line for the default guest under our KVM.  console
    "hvc0" needs the virtio console; "ttyS0" the 8250 at 0x3f8.  root (e.g.
    "/dev/vda"): boot from the ext4 root disk instead of an initramfs.
    host_tuning: add SOFTWARE_KVM_CMDLINE (None: where this host's KVM is a
    software one)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", workload):
        raise ValueError(f"bad workload name {workload!r}")
    if host_tuning is None:
        from lguest_jit.hw.hosts import software_kvm
        host_tuning = software_kvm() is not None
    parts = [BASE_CMDLINE] + ([SOFTWARE_KVM_CMDLINE] if host_tuning else [])
    if console == "ttyS0":
        parts.append("earlyprintk=serial")
    parts += [f"console={console}", f"lguest_jit.workload={workload}"]
    if root is not None:
        if not re.fullmatch(r"/dev/[a-z0-9]+", root):
            raise ValueError(f"bad root device {root!r}")
        # rw: no remount (and journal work) in init; rootfstype: no probing.
        parts.append(f"root={root} rootfstype=ext4 rw")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def cached_guest() -> tuple[Path, Path] | None:
    """(vmlinux, initramfs) if both are already built, else None; never builds."""
    vmlinux, initrd = cached_kernel(), cached_initramfs()
    if vmlinux is None or initrd is None:
        return None
    return vmlinux, initrd


def _ensure(cached, make, *, force: bool, apt: bool, log):
    got = None if force else cached()
    if got is not None:
        return got
    if apt:
        ensure_packages(log=log)
    return make()


def ensure_guest(*, force: bool = False, apt: bool = True, log=print) -> tuple[Path, Path]:
    """(vmlinux, initramfs), building whatever is missing (minutes the first
    time on a machine, instant afterwards)."""
    return _ensure(cached_guest, lambda: (build_kernel(force=force, log=log), build_initramfs(force=force, log=log)),
                   force=force, apt=apt, log=log)


def ensure_rootfs(*, force: bool = False, apt: bool = True, log=print) -> Path:
    """The pristine root-disk image, built if missing (seconds)."""
    return _ensure(cached_rootfs, lambda: build_rootfs(force=force, log=log), force=force, apt=apt, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--bzimage", action="store_true",
                    help="also build a bzImage and install QEMU (booting under other VMMs)")
    ap.add_argument("--no-apt", action="store_true", help="never run apt-get")
    ap.add_argument("--jobs", type=int, default=None, help="make -j (default: all cores)")
    ap.add_argument("--initramfs-only", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # The caller reads our stdout (scripts parse the JSON), so for the whole
    # build fd 1 is fd 2: whatever a tool or library prints goes to stderr.
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        try:
            if not args.no_apt:
                ensure_packages(APT_PACKAGES + (OTHER_VMM_PACKAGES if args.bzimage else ()), log=log)
            initrd = build_initramfs(force=args.force, log=log)
            if args.initramfs_only:
                result = {"initramfs": str(initrd)}
            else:
                rootfs = build_rootfs(force=args.force, log=log)
                vmlinux = build_kernel(force=args.force, bzimage=args.bzimage, jobs=args.jobs, log=log)
                result = {"vmlinux": str(vmlinux), "initramfs": str(initrd), "rootfs": str(rootfs),
                          "cmdline": default_cmdline()}
        except (RuntimeError, subprocess.CalledProcessError, ValueError, OSError) as e:
            print(f"guest: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                  file=sys.stderr)
            return 1
    finally:
        sys.stdout.flush()
        os.dup2(result_fd, 1)
        os.close(result_fd)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for key in ("vmlinux", "initramfs", "rootfs"):
            if key in result:
                print(result[key], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
