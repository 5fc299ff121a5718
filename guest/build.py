"""Build the default guest: a small Linux from Debian's linux-source and a
busybox initramfs.

    python -m guest.build [--force] [--bzimage] [--no-apt] [--json]

The kernel is `make tinyconfig` + guest/kernel.config + `make olddefconfig`,
built once per (fragment, kernel source version) and cached; the initramfs is
an uncompressed newc cpio written here (no cpio tool), cached per content.
The last two lines printed are the vmlinux and initramfs paths.

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

KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# Debian packages the build needs.  libssl-dev/xz-utils: certificate and
# tarball tooling used by the kernel build; busybox-static: the userland.
APT_PACKAGES = (
    KERNEL_SOURCE_PACKAGE, "build-essential", "bc", "flex", "bison",
    "libelf-dev", "libssl-dev", "xz-utils", "busybox-static", "patch",
)
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
    "dmesg", "ps", "kill", "free", "stat", "cp", "mv", "rm", "ln", "test",
    "[", "true", "false", "env", "seq", "cut", "xxd", "uptime", "vi", "less",
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
BASE_CMDLINE = (
    "acpi=off nokaslr panic=-1 noxsave tsc=reliable mitigations=off "
    "clearcpuid=smap,cx16,rdrand,rdseed,popcnt,fsgsbase,invpcid,pcid "
    "syscall_fault_entry rodata=off pci=noearly"
)


# --------------------------------------------------------------------------
# cache layout
# --------------------------------------------------------------------------

def cache_dir() -> Path:
    """The guest cache directory ($LGUEST_JIT_CACHE/guest)."""
    root = os.environ.get("LGUEST_JIT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lguest-jit"
    return base / "guest"


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
    """apt-get install whatever is missing; does nothing when all present."""
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError("missing Debian packages (run as root or install): "
                           + " ".join(missing))
    log(f"guest: installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env).returncode != 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


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
    subprocess.run(["tar", "-xf", str(KERNEL_TARBALL), "-C", str(tmp)], check=True)
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
    r = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT if logfile else None)
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


def initramfs_entries(busybox: bytes, init_script: bytes, applets=APPLETS) -> list[CpioEntry]:
    """The guest's root filesystem: busybox, its applet links and /init."""
    entries = [directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "root", "etc")]
    # The kernel opens /dev/console before /init runs and before anything
    # mounts devtmpfs, so the node must be in the archive.
    entries.append(char_device("dev/console", 5, 1))
    entries.append(regular("bin/busybox", busybox, 0o755))
    entries.extend(symlink(f"bin/{a}", "busybox") for a in applets)
    entries.append(regular("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(regular("etc/group", b"root:x:0:\n"))
    entries.append(regular("init", init_script, 0o755))
    return entries


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
    for part in (RECIPE_VERSION.encode(), busybox, init_script, "\n".join(APPLETS).encode()):
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
    _atomic_write(out, write_newc(initramfs_entries(busybox, init_script)))
    log(f"guest: wrote {out} ({out.stat().st_size} bytes)")
    return out


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------

def default_cmdline(workload: str = "selftest", console: str = "hvc0",
                    extra: str = "") -> str:
    """Kernel command line for the default guest under our KVM.  console
    "hvc0" needs the virtio console; "ttyS0" the 8250 at 0x3f8."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", workload):
        raise ValueError(f"bad workload name {workload!r}")
    parts = [BASE_CMDLINE]
    if console == "ttyS0":
        parts.append("earlyprintk=serial")
    parts += [f"console={console}", f"lguest_jit.workload={workload}"]
    if extra:
        parts.append(extra)
    return " ".join(parts)


def cached_guest() -> tuple[Path, Path] | None:
    """(vmlinux, initramfs) if both are already built, else None; never builds."""
    vmlinux, initrd = cached_kernel(), cached_initramfs()
    if vmlinux is None or initrd is None:
        return None
    return vmlinux, initrd


def ensure_guest(*, force: bool = False, apt: bool = True, log=print) -> tuple[Path, Path]:
    """(vmlinux, initramfs), building whatever is missing (minutes the first
    time on a machine, instant afterwards)."""
    if not force:
        got = cached_guest()
        if got is not None:
            return got
    if apt:
        ensure_packages(log=log)
    return build_kernel(force=force, log=log), build_initramfs(force=force, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--bzimage", action="store_true",
                    help="also build a bzImage (for booting under other VMMs)")
    ap.add_argument("--no-apt", action="store_true", help="never run apt-get")
    ap.add_argument("--jobs", type=int, default=None, help="make -j (default: all cores)")
    ap.add_argument("--initramfs-only", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if not args.no_apt:
            ensure_packages(log=log)
        initrd = build_initramfs(force=args.force, log=log)
        if args.initramfs_only:
            print(initrd)
            return 0
        vmlinux = build_kernel(force=args.force, bzimage=args.bzimage, jobs=args.jobs, log=log)
    except (RuntimeError, subprocess.CalledProcessError, ValueError) as e:
        print(f"guest: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"vmlinux": str(vmlinux), "initramfs": str(initrd),
                          "cmdline": default_cmdline()}))
    else:
        print(vmlinux)
        print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
