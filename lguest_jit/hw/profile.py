"""Where a guest run spends its time: the vCPU's instruction pointer sampled
at a fixed rate, symbolized with the kernel's ELF symbol table, written as
folded stacks (the text format flamegraph.pl, inferno and speedscope read:
one ``frame;frame;... count`` line per distinct stack) and summed up as a
table of the hottest functions.

How a sample is taken: a POSIX timer (``timer_create`` with
SIGEV_THREAD_ID) sends the KVM backend's kick signal to each vCPU's thread
``hz`` times a second (one timer per vCPU; with more than one vCPU every
folded stack starts with the sampled CPU's frame, ``cpu0``, ``cpu1``...).  The signal makes KVM_RUN return EINTR, the run loop
calls ``vcpu.KvmVm._on_signal()``, which calls :meth:`Profiler.sample`, and the
loop re-enters the guest.  The sample reads RIP and CS (for the privilege
level) from the kvm_run page, where KVM stores them at every exit while
the profile runs (KVM_CAP_SYNC_REGS): a register ioctl costs ~20 us on
software-KVM hosts (it loads the vCPU), two of them per sample 4-5 % of
the guest's time at 1000 Hz.  Without the capability, the ioctls it is.  No helper thread wakes up in
Python and the guest sees nothing but the time the exit took.  A signal
that lands while the vCPU thread is outside KVM_RUN (handling an exit) is
no sample: the profile is of guest time.  A tick that falls while the
previous signal is still pending (the host ran something else on the
vCPU's CPU) is counted with the next sample, where the guest still was
(``timer_getoverrun``), so the counts stay proportional to wall time.

Stacks are leaf-only (``[kernel];function`` or ``[user]``): the default
guest's kernel has no frame pointers (CONFIG_UNWINDER_GUESS), so there is
no chain to walk.
"""
from __future__ import annotations

import bisect
import collections
import ctypes
import fcntl
import functools
import os
import signal
import threading
import time

from .hosts import MAX_SAMPLE_HZ, default_sample_hz
from .kvm import KICK_SIGNAL, KVM_GET_REGS, KVM_GET_SREGS, kvm_regs, kvm_sregs
from .x86 import CR0_PE

TOP = 20

USER_FRAME = "[user]"
KERNEL_FRAME = "[kernel]"


class ProfileError(ValueError):
    """A profiling request this host or this kernel image cannot honour."""


# ---------------------------------------------------------------------------
# A per-thread interval timer (timer_create(2) with SIGEV_THREAD_ID)

_SIGEV_THREAD_ID = 4
_CLOCK_MONOTONIC = 1


class _sigevent(ctypes.Structure):
    # x86-64 glibc layout: sigval, signo, notify, then a 48-byte union whose
    # first int is the thread id for SIGEV_THREAD_ID.
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("sigev_tid", ctypes.c_int), ("pad", ctypes.c_int * 11)]


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


assert ctypes.sizeof(_sigevent) == 64


def _librt():
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "timer_create"):          # glibc before 2.34 keeps them in librt
        libc = ctypes.CDLL("librt.so.1", use_errno=True)
    return libc


class ThreadTimer:
    """Sends ``signo`` to thread ``tid`` every ``1/hz`` seconds until closed."""

    def __init__(self, tid: int, signo: int, hz: int):
        self._rt = _librt()
        self._id = ctypes.c_void_p()
        ev = _sigevent(sigev_signo=int(signo), sigev_notify=_SIGEV_THREAD_ID, sigev_tid=tid)
        if self._rt.timer_create(_CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(self._id)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timer_create failed: {os.strerror(err)}")
        period = _timespec(0, 1_000_000_000 // hz) if hz > 1 else _timespec(1, 0)
        spec = _itimerspec(it_interval=period, it_value=period)
        if self._rt.timer_settime(self._id, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            self.close()
            raise OSError(err, f"timer_settime failed: {os.strerror(err)}")

    def overrun(self) -> int:
        """Expirations since the last signal that sent none: the thread did
        not run to take it (timer_getoverrun(2))."""
        return max(0, self._rt.timer_getoverrun(self._id)) if self._id is not None else 0

    def close(self) -> None:
        if self._id is not None:
            self._rt.timer_delete(self._id)
            self._id = None


# ---------------------------------------------------------------------------
# Sampling

# kvm_run (<linux/kvm.h>): after the 32-byte header and the 256-byte exit
# union, kvm_valid_regs (u64), kvm_dirty_regs (u64), then kvm_sync_regs:
# kvm_regs (RIP at +128), kvm_sregs (CS first: selector at +12; CR0 at +224).
KVM_CAP_SYNC_REGS = 74
KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS = 1, 2
RUN_VALID_REGS = 288
RUN_SYNC_RIP = 304 + 128
RUN_SYNC_CS_SELECTOR = 304 + 144 + 12
RUN_SYNC_CR0 = 304 + 144 + 224

class _VcpuSampler:
    """One vCPU's side of a profile: its fd, timer and synced-register views."""

    def __init__(self, fd: int):
        self.fd = fd
        self.regs = kvm_regs()
        self.sregs = kvm_sregs()
        self.run64 = self.run16 = None      # views of kvm_run while synced registers are on
        self.timer = None
        self.t0 = None


class Profiler:
    """RIP samples of a KVM guest's vCPUs.  ``attach(vm)``, then ``start()``
    on the thread that will call ``vm.run()`` (vCPU 0), ``stop()`` after it
    returns; the VM arms and disarms the other vCPUs' timers on their own
    threads (``start(vcpu=i)``/``stop(vcpu=i)``).  Each sample records its
    vCPU (``cpus``); the folded stacks of a guest with more than one name
    it as their first frame (``cpu1;[kernel];schedule``)."""

    def __init__(self, hz: int | None = None, sync_regs: bool = True):
        self.hz = default_sample_hz() if hz is None else hz
        if not 1 <= self.hz <= MAX_SAMPLE_HZ:
            raise ProfileError(f"profile rate {self.hz} Hz is outside 1..{MAX_SAMPLE_HZ}")
        self._vm = None
        self._per: dict[int, _VcpuSampler] = {}
        self._want_sync = sync_regs
        self._lock = threading.Lock()        # vCPU threads append samples at once
        self.rips: list[int] = []
        self.cpls: list[int] = []
        self.cpus: list[int] = []        # the vCPU of each sample (empty: all vCPU 0, as a test may set)
        self.weights: list[int] = []     # 1 + the timer ticks that fell while the vCPU thread was off CPU
        self.failed = 0          # samples whose register read failed (the vCPU was being torn down)
        self.seconds = 0.0

    def attach(self, vm) -> "Profiler":
        vm.profiler = self
        self._vm = vm
        self._per = {v.index: _VcpuSampler(v.fd) for v in getattr(vm, "vcpus", [])} or {0: _VcpuSampler(vm.vcpu_fd)}
        return self

    @property
    def running(self) -> bool:
        """True between vCPU 0's ``start()`` and ``stop()``."""
        p = self._per.get(0)
        return p is not None and p.timer is not None

    @property
    def synced(self) -> bool:
        """True while vCPU 0's samples come from kvm_run's synced registers."""
        p = self._per.get(0)
        return p is not None and p.run64 is not None

    def start(self, tid: int | None = None, vcpu: int = 0) -> None:
        """Arm vCPU ``vcpu``'s timer aimed at thread ``tid`` (default: the
        calling one, which must be the one running that vCPU)."""
        p = self._per.get(vcpu)
        if p is None:
            raise ProfileError("attach the profiler to a VM before starting it")
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            # With no handler the kick signal would kill the process.
            raise ProfileError("the KVM kick signal has no handler: build the first KvmVm on the main thread")
        tid = threading.get_native_id() if tid is None else tid
        wanted = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
        if self._want_sync and self._vm.check_extension(KVM_CAP_SYNC_REGS) & wanted == wanted:
            vcpus = getattr(self._vm, "vcpus", None)
            run = memoryview(vcpus[vcpu].run_map if vcpus else self._vm.run_map)
            p.run64, p.run16 = run.cast("Q"), run.cast("H")
            run.release()
            p.run64[RUN_VALID_REGS >> 3] = wanted
        p.timer = ThreadTimer(tid, KICK_SIGNAL, self.hz)
        p.t0 = time.monotonic()

    def stop(self, vcpu: int = 0) -> None:
        p = self._per.get(vcpu)
        if p is None:
            return
        if p.timer is not None:
            p.timer.close()
            p.timer = None
            if vcpu == 0:
                self.seconds += time.monotonic() - p.t0
        if p.run64 is not None:
            p.run64[RUN_VALID_REGS >> 3] = 0
            # Released now: the VM cannot unmap kvm_run while a view is alive.
            p.run64.release()
            p.run16.release()
            p.run64 = p.run16 = None

    def sample(self, vcpu: int = 0) -> None:
        """One sample of vCPU ``vcpu``, on its thread while it is out of
        KVM_RUN.  Nothing is sampled for a vCPU whose timer is not armed
        (a kick from the halt poll or stop())."""
        p = self._per.get(vcpu)
        if p is None or p.timer is None:
            return
        r64 = p.run64
        if r64 is not None:
            rip, cs, cr0 = r64[RUN_SYNC_RIP >> 3], p.run16[RUN_SYNC_CS_SELECTOR >> 1], r64[RUN_SYNC_CR0 >> 3]
        else:
            try:
                fcntl.ioctl(p.fd, KVM_GET_REGS, p.regs)
                fcntl.ioctl(p.fd, KVM_GET_SREGS, p.sregs)
            except OSError:
                self.failed += 1
                return
            rip, cs, cr0 = p.regs.rip, p.sregs.cs.selector, p.sregs.cr0
        # A tick that found the previous one still pending (the host ran
        # something else on this CPU) sent no signal: the guest was still
        # here, so the sample stands for those ticks too and the profile
        # stays one of wall time.
        weight = 1 + p.timer.overrun()
        with self._lock:
            # CPL is CS's RPL in protected and long mode; real mode runs at 0.
            self.cpls.append(cs & 3 if cr0 & CR0_PE else 0)
            self.rips.append(rip)
            self.cpus.append(vcpu)
            self.weights.append(weight)

    def counts(self) -> collections.Counter:
        """(cpl, rip) -> samples, each weighted by the ticks it stands for."""
        out = collections.Counter()
        for key, w in zip(zip(self.cpls, self.rips), self.weights):
            out[key] += w
        return out

    def counts_by_cpu(self) -> dict[int, collections.Counter]:
        """vCPU -> its ``counts()``."""
        cpus = self.cpus if len(self.cpus) == len(self.rips) else [0] * len(self.rips)
        out: dict[int, collections.Counter] = {}
        for cpu, cpl, rip, w in zip(cpus, self.cpls, self.rips, self.weights):
            out.setdefault(cpu, collections.Counter())[(cpl, rip)] += w
        return out


# ---------------------------------------------------------------------------
# Symbols

# Elf64_Sym and Elf32_Sym, little-endian (numpy dtype specs).
_SYM_FIELDS = {
    64: [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")],
    32: [("name", "<u4"), ("value", "<u4"), ("size", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2")],
}
_STT_NOTYPE, _STT_FUNC = 0, 2
_STB_GLOBAL = 1


class Symbols:
    """Address -> function name from an ELF symbol table: the starts of
    code symbols sorted once, each lookup a bisect.  Names are read from
    the string table only for addresses that are looked up."""

    def __init__(self, starts, sizes, name_offsets, strtab: bytes):
        self.starts = [int(v) for v in starts]
        self._sizes = [int(v) for v in sizes]
        self._names = [int(v) for v in name_offsets]
        self._strtab = strtab

    def __len__(self):
        return len(self.starts)

    @classmethod
    def from_elf(cls, path: str) -> "Symbols":
        """The code symbols of ELF file ``path``; ProfileError (saying
        why) for an image that is not an ELF file or has no symbol table."""
        import numpy as np
        from elftools.common.exceptions import ELFError
        from elftools.elf.constants import SH_FLAGS
        from elftools.elf.elffile import ELFFile
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise ProfileError(f"{path} is not an ELF vmlinux (a bzImage or raw image has no symbol table)")
            f.seek(0)
            try:
                elf = ELFFile(f)
                symtab = elf.get_section_by_name(".symtab")
                if symtab is None or symtab["sh_entsize"] == 0:
                    raise ProfileError(f"{path} has no symbol table (stripped)")
                if not elf.little_endian:
                    raise ProfileError(f"{path} is big-endian: not an x86 kernel")
                code = np.array([bool(s["sh_flags"] & SH_FLAGS.SHF_EXECINSTR) for s in elf.iter_sections()]
                                + [False])
                strtab = elf.get_section(symtab["sh_link"]).data()
                raw = symtab.data()
            except ELFError as exc:
                raise ProfileError(f"{path}: unreadable ELF file ({exc})") from None
        dt = np.dtype(_SYM_FIELDS[elf.elfclass])
        syms = np.frombuffer(raw, dtype=dt, count=len(raw) // dt.itemsize)
        kind = syms["info"] & 0xF
        shndx = np.minimum(syms["shndx"].astype(np.int64), len(code) - 1)   # SHN_ABS etc. are not code
        keep = ((kind == _STT_FUNC) | (kind == _STT_NOTYPE)) & code[shndx] & (syms["name"] != 0)
        syms = syms[keep]
        # At one address several names (aliases, local labels): the sort
        # puts functions, then globals, last, and the last one wins.
        rank = (syms["info"] & 0xF == _STT_FUNC).astype(np.int64) * 2 + (syms["info"] >> 4 == _STB_GLOBAL)
        order = np.lexsort((rank, syms["value"].astype(np.uint64)))
        syms = syms[order]
        values = syms["value"].astype(np.uint64)
        last = np.ones(len(values), dtype=bool)
        last[:-1] = values[1:] != values[:-1]
        syms = syms[last]
        if len(syms) == 0:
            raise ProfileError(f"{path} has no code symbols")
        return cls(syms["value"], syms["size"], syms["name"], strtab)

    def _name(self, i: int) -> str:
        off = self._names[i]
        end = self._strtab.find(b"\0", off)
        return self._strtab[off:end if end >= 0 else len(self._strtab)].decode(errors="replace")

    def lookup(self, addr: int) -> str | None:
        """The function containing ``addr``, or None (before the first
        symbol, or past the end of a sized one)."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return None
        size = self._sizes[i]
        if size and addr >= self.starts[i] + size:
            return None
        return self._name(i)


# ---------------------------------------------------------------------------
# Folding, the table, the file

def fold(counts, symbols: Symbols | None) -> collections.Counter:
    """Folded stacks (``frame;frame`` -> samples) from (cpl, rip) counts:
    user mode as ``[user]``, kernel code as ``[kernel];function`` (or its
    raw address where there is no symbol for it)."""
    out = collections.Counter()
    for (cpl, rip), n in counts.items():
        if cpl == 3:
            out[USER_FRAME] += n
            continue
        name = symbols.lookup(rip) if symbols is not None else None
        out[f"{KERNEL_FRAME};{name if name is not None else f'{rip:#x}'}"] += n
    return out


def folded_text(stacks: collections.Counter) -> str:
    """One ``stack count`` line per stack, hottest first."""
    return "".join(f"{stack} {n}\n" for stack, n in sorted(stacks.items(), key=lambda kv: (-kv[1], kv[0])))


def parse_folded(text: str) -> collections.Counter:
    """Read folded stacks as flamegraph.pl does: the count is the last
    whitespace-separated number on the line, the frames before it split
    on ';'.  Returns (frames tuple) -> samples; a malformed line is a
    ValueError naming it."""
    out = collections.Counter()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"line {lineno}: not 'frame;frame count': {line!r}")
        out[tuple(stack.split(";"))] += int(count)
    return out


def leaf_totals(stacks: collections.Counter) -> collections.Counter:
    """Samples per leaf frame (the function the vCPU was in)."""
    out = collections.Counter()
    for stack, n in stacks.items():
        out[stack.rsplit(";", 1)[-1]] += n
    return out


def top_table(stacks: collections.Counter, n: int = TOP) -> list[str]:
    total = sum(stacks.values())
    lines = [f"  {'rank':>4} {'samples':>8} {'%':>6}  function"]
    for rank, (name, c) in enumerate(leaf_totals(stacks).most_common(n), 1):
        lines.append(f"  {rank:>4} {c:>8} {100.0 * c / total:>5.1f}%  {name}")
    return lines


def launcher_lines(stats: dict) -> list[str]:
    """The launcher's side from ``Launcher.stats()``: CPU seconds per
    thread, exits by kind, interrupts per queue."""
    wall = stats.get("elapsed_s") or 0.0
    lines = [f"  launcher threads over {wall:.2f} s wall (CPU seconds, user + system):"]
    for name, t in sorted(stats.get("threads", {}).items(), key=lambda kv: -(kv[1]["user_s"] + kv[1]["system_s"])):
        cpu = t["user_s"] + t["system_s"]
        share = f"{100.0 * cpu / wall:5.1f}%" if wall > 0 else "    -"
        lines.append(f"    {name:28s} {cpu:9.3f} s {share}  (user {t['user_s']:.3f}, system {t['system_s']:.3f})")
    ex = stats.get("exits")
    if ex:
        lines.append("  exits: " + " ".join(f"{k} {v}" for k, v in ex.items() if not isinstance(v, dict)))
        # Breakdowns (assisted instructions, exits per device register...), busiest first.
        for what, by in ex.items():
            if isinstance(by, dict) and by:
                top = sorted(by.items(), key=lambda kv: -kv[1])[:12]
                lines.append(f"  exits, {what}: " + ", ".join(f"{k} {v}" for k, v in top))
    irqs = [f"{dev}/{q} {c['interrupts']}" for dev, queues in stats.get("queues", {}).items()
            for q, c in queues.items() if "interrupts" in c]
    if irqs:
        lines.append("  interrupts per queue: " + ", ".join(irqs))
    return lines


def _stacks(profiler: Profiler, symbols: Symbols | None) -> collections.Counter:
    by_cpu = profiler.counts_by_cpu()
    if len(by_cpu) <= 1:
        return fold(profiler.counts(), symbols)
    # More than one vCPU sampled: the CPU is each stack's first frame.
    stacks = collections.Counter()
    for cpu, counts in sorted(by_cpu.items()):
        for stack, n in fold(counts, symbols).items():
            stacks[f"cpu{cpu};{stack}"] += n
    return stacks


def report(profiler: Profiler, kernel: str, path: str | None, launcher_stats: dict | None = None) -> list[str]:
    """Symbolize ``profiler``'s samples with ``kernel``'s symbol table,
    write the folded stacks to ``path`` (if given) and return the report
    lines: a header, a note when there are no symbols, the top table, the
    launcher's side."""
    symbols, notes = None, []
    try:
        symbols = Symbols.from_elf(kernel)
    except (ProfileError, OSError) as exc:
        notes.append(f"  no kernel symbols: {exc}; kernel addresses are printed raw")
    stacks = _stacks(profiler, symbols)
    if path is not None:
        try:
            with open(path, "w") as f:
                f.write(folded_text(stacks))
        except OSError as exc:
            # Checked writable before the run; whatever changed since, the table below still prints.
            notes.append(f"  could not write {path}: {exc.strerror}")
            path = None
    total = sum(stacks.values())
    user = leaf_totals(stacks).get(USER_FRAME, 0)
    taken = len(profiler.rips)
    head = (f"lguest-jit profile: {total} samples at {profiler.hz} Hz over {profiler.seconds:.2f} s"
            + (f" ({taken} taken, {total - taken} ticks the host delayed counted with them)" if taken != total else "")
            + (f" (kernel {100.0 * (total - user) / total:.1f}%, user {100.0 * user / total:.1f}%)" if total else "")
            + (f", folded stacks in {path}" if path else ""))
    lines = [head] + notes
    lines += top_table(stacks) if total else ["  no samples: the guest did not run long enough"]
    if profiler.failed:
        lines.append(f"  {profiler.failed} samples lost (register read failed)")
    if launcher_stats is not None:
        lines += launcher_lines(launcher_stats)
    return lines


@functools.lru_cache(maxsize=4)
def _symbols_of(kernel: str):
    try:
        return Symbols.from_elf(kernel)
    except (ProfileError, OSError):
        return None


def folded_now(profiler: Profiler, kernel: str) -> str:
    """The folded stacks of the samples taken so far (SIGUSR1 writes them
    mid-run), led by a cpuN frame as at exit; the kernel's symbols are read once."""
    return folded_text(_stacks(profiler, _symbols_of(kernel)))


__all__ = ["Profiler", "Symbols", "ProfileError", "ThreadTimer", "fold", "folded_text", "parse_folded", "leaf_totals",
           "top_table", "launcher_lines", "report", "folded_now"]
