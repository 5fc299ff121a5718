"""The vCPU loop: the one home of the exit path.

A KVM vCPU runs in ``_vcpu_loop``, a nogil kernel: KVM_RUN through libc's
ioctl, each exit answered by ``handle_exit`` from the bus's flat tables
(port and MMIO dispatch: ``pci.bus.port_access``/``mmio_access``, the
compiled UART/CMOS/conf1/reset ports, BAR0 registers, notify eventfds, the
int3/fwait assist), back to Python only when it must be.  ``VcpuLoop`` is
the Python driver around it (signals, stop, timeout, ``max_exits``, the
exits and accesses only Python finishes) and ``KvmVm`` the KVM machine
whose vCPU it runs (``hw.kvm.KvmVmBase`` plus ``run``/``stop``).  Tests'
rigs are real ``pci.Bus`` objects with Python handlers
(``Bus.set_fallback``): there is one loop, and under
``NUMBA_DISABLE_JIT=1`` it is the same code run by Python.  Layer: above
``pci`` (it dispatches into it), below devices and main.

Loop protocol
=============
Each vCPU has an int64 control array ``ctl`` (V_* fields) shared with its
loop, and the loop returns a VCPU_* code, or R_SLOW_PIO/R_SLOW_MMIO for
an access Python must finish (the vCPU's pending record ``pend`` says
where; ``VcpuLoop`` finishes it through ``Bus.pio_python`` /
``Bus.finish_mmio`` and re-enters).  The loop returns to Python only for:
a signal (EINTR: ``KvmVm._on_signal()``, then stop/timeout/halt poll),
``ctl[V_STOP]``, ``max_exits``, an exit only Python handles (halt,
shutdown, system event, fatal/unknown, an assist the compiled one
declines: ``KvmVmBase.internal_error``), and accesses only Python can
finish (a Python port handler, a conf1 hook, the reset port's 0xFE,
8-byte BAR0 accesses, any BAR0 action but A_NONE/A_NOTIFY or a driver
error).

Per vCPU and shared
===================
``KvmVm.run`` runs vCPU 0's loop on the calling thread and every other
vCPU's on a thread of its own (``vcpuN``), each in ``_vcpu_loop`` without
the GIL, so exits of different vCPUs are handled at the same time.

Per vCPU (``VcpuLoop`` and the ``hw.kvm.KvmVcpu`` it drives; never
shared): the vCPU fd and its kvm_run page, ``ctl`` (stop flag, exit limit,
exit counters, errno), the assist state (``KvmVcpu.assist``: repeat
detection and register scratch), the pending record ``pend``,
``ExitStats``, the thread it runs on, the halt poll's question and answer,
and the port/MMIO access counters (``Bus.vcpu_tables``: vCPU 0 counts into
the bus's own arrays, the others into arrays of their own; ``--stats``
and ``Bus.access_counts`` sum them, so no count is lost to two plain
increments at once).  Shared (the bus's ``tables``, T_* order, and the
machine's flags), with what concurrent vCPUs may do to each:

* ``conf`` (the conf1 address latch) and ``space`` (config space): the
  latch is one register of the host bridge, shared by every CPU as on a
  real PC; two vCPUs doing conf1 cycles at once can interleave address and
  data exactly as two real CPUs can (Linux serializes them with its
  pci_config_lock).  The host stays safe whatever a guest does: the data
  port reads the latch once and bounds-checks that value.  No lock.
* ``ports`` (port table) and ``page_slot`` (BAR decode): read-only in the
  loop; written only by Python under the bus lock (claims, BAR writes).
  A BAR move racing another vCPU's access to the old address may decode
  it either way, as on real PCI.  Safe.
* ``kstate`` (UART and CMOS registers): one device each, as on a PC: a
  guest driving one from two CPUs at once without a lock (Linux's 8250
  and RTC drivers hold one) can interleave register updates as it could on
  hardware.  Every compiled access bounds-checks what it reads, so the
  host stays safe; no lock on the exit path (measured: ``bench exits``).
* ``regs``/``bytes_`` (BAR0 registers, ISR, device config): written by
  ``bar0_access`` without the bus lock on the fast path.  Per device one
  driver (one vCPU at a time under Linux's per-device locking) programs
  the registers; the ISR byte is shared with device threads already (see
  ``pci.bus``, "Threads"); anything that changes what the host does
  (queue enable, MSI-X enable, status) goes to Python under the bus lock.
* ``msix`` (MSI-X tables): the pending bit is only changed by atomic
  exchange (``irq``), safe for any number of vCPUs and device threads;
  entries and masks are written by one driver per device, as ``regs``.
* ``notify_fd``: read-only in the loop; eventfd writes are atomic.  Safe.
* ``KvmVm._stop``/``_timed_out``/``_reset_requested``/``_result``:
  machine-wide.  The first result that is not a plain stop, from any
  vCPU, is the machine's (``_conclude``, under a lock); it stops every
  vCPU: ``stop()`` sets each one's ``ctl[V_STOP]`` and immediate_exit and
  kicks its thread out of KVM_RUN (a halted vCPU with interrupts off
  never leaves it otherwise), and ``run`` joins every vCPU thread before
  it returns.  vCPU threads other than 0 block every signal but the kick,
  so ^C, SIGTERM and the launcher's other signals reach the main thread,
  whose handlers end the run the same way.  The machine has halted when
  every vCPU is parked (HLT with IF clear, or an AP waiting for INIT).

Cost rules (HACKING.md, "The compiled vCPU loop"): ``_vcpu_loop`` is
compiled with ``_nrt=False`` and nothing it reaches may allocate;
``handle_exit`` and the dispatch kernels are ``inline='always'``.
"""
from __future__ import annotations

import os
import resource
import signal
import threading
import time

import numpy as np
from numba import njit

from .hw.kvm import (AS_FWAIT, AS_INT3, ASSIST_DONE, EXIT_NAMES, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT,
                     KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_IRQ_WINDOW_OPEN,
                     KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT, KVM_RUN, KVM_SYSTEM_EVENT_RESET,
                     KVM_SYSTEM_EVENT_SHUTDOWN, RUN_EXIT_REASON, RUN_FAIL_REASON, RUN_IMMEDIATE_EXIT, RUN_IO_COUNT,
                     RUN_IO_DATA_OFFSET, RUN_IO_DIRECTION, RUN_IO_PORT, RUN_IO_SIZE, RUN_MMIO_DATA,
                     RUN_MMIO_IS_WRITE, RUN_MMIO_LEN, RUN_MMIO_PHYS, RUN_SYSEV_TYPE, ExitStats, KvmVcpu, KvmVmBase,
                     RunResult, assist, kick, KICK_SIGNAL)
from .hw.libc import EAGAIN, EINTR, sys_ioctl
from .hw.memory import ld_u8, ld_u16, ld_u32, ld_u64, st_u8, st_u16, st_u32, st_u64
from .pci.bus import PD_FIELDS, PD_INDEX, ST_DONE, mmio_access, port_access
from .pci.config import read_le, write_le

# The control array each vCPU shares with its loop (``VcpuLoop.ctl``).
V_STOP = 0          # stop() sets it; the loop returns VCPU_STOPPED before its next KVM_RUN
V_LIMIT = 1         # V_EXITS value at which the loop returns VCPU_LIMIT (-1: no limit)
V_EXITS = 2         # exits, all kinds (cumulative over the vCPU's life)
V_PIO = 3           # port-I/O exits
V_MMIO = 4          # MMIO exits
V_INTR = 5          # KVM_EXIT_INTR exits
V_ERRNO = 6         # errno of a failed KVM_RUN (VCPU_ERRNO)
V_FIELDS = 8
# What the loop returns
VCPU_LIMIT = 1      # ctl[V_LIMIT] exits handled
VCPU_STOPPED = 2    # ctl[V_STOP] was set
VCPU_EINTR = 3      # KVM_RUN returned EINTR: a signal (stop, timeout, halt poll, profiler)
VCPU_ERRNO = 4      # KVM_RUN failed otherwise
VCPU_EXIT = 5       # an exit only Python handles (halt, shutdown, system event, fatal, unknown)
R_SLOW_PIO = 16     # an access Python must finish before re-entering (``pend`` says where)
R_SLOW_MMIO = 17


@njit(nogil=True, cache=True, inline='always')
def _load(buf, off, size):
    if size == 1:
        return ld_u8(buf, off)
    if size == 2:
        return ld_u16(buf, off)
    if size == 4:
        return ld_u32(buf, off)
    return ld_u64(buf, off)


@njit(nogil=True, cache=True, inline='always')
def _store(buf, off, size, value):
    if size == 1:
        st_u8(buf, off, value & 0xFF)
    elif size == 2:
        st_u16(buf, off, value & 0xFFFF)
    elif size == 4:
        st_u32(buf, off, value & 0xFFFFFFFF)
    else:
        st_u64(buf, off, value)


@njit(nogil=True, cache=True, inline='always')
def handle_exit(run, ctl, ast, pend, conf, space, ports, kstate, page_slot, regs, bytes_, msix, notify_fd,
                port_counts, mmio_counts):
    """Handle the exit described in the kvm_run page ``run`` (uint8) of one
    vCPU (``ctl``: its V_* fields, ``ast``: its assist state, ``pend``: its
    pending record) with the bus's shared tables (``Bus.tables``, unpacked
    once by the caller: each array passed across a call costs tens of ns).
    Returns 0
    when the vCPU may run on, a VCPU_* code for an exit only Python
    handles, or R_SLOW_PIO/R_SLOW_MMIO for an access Python must finish
    (``pend`` says where).  Public so a benchmark can drive it with a
    kvm_run-shaped page exactly as the vCPU loop does."""
    reason = ld_u32(run, RUN_EXIT_REASON)
    if reason == KVM_EXIT_IO:
        ctl[V_PIO] += 1
        size = ld_u8(run, RUN_IO_SIZE)
        port = ld_u16(run, RUN_IO_PORT)
        count = ld_u32(run, RUN_IO_COUNT)
        data = ld_u64(run, RUN_IO_DATA_OFFSET)
        if (size != 1 and size != 2 and size != 4) or data < 0 or data + count * size > run.size:
            return VCPU_EXIT               # not what KVM sends: Python reports it
        is_write = ld_u8(run, RUN_IO_DIRECTION) == KVM_EXIT_IO_OUT
        for i in range(count):
            at = data + i * size
            v = _load(run, at, size) if is_write else 0
            r, st = port_access(conf, space, ports, kstate, port_counts, port, size, is_write, v)
            if st != ST_DONE:
                pend[PD_INDEX] = i
                return R_SLOW_PIO
            if not is_write:
                _store(run, at, size, r)
        return 0
    if reason == KVM_EXIT_MMIO:
        ctl[V_MMIO] += 1
        ln = ld_u32(run, RUN_MMIO_LEN)
        if ln != 1 and ln != 2 and ln != 4 and ln != 8:
            return VCPU_EXIT
        addr = ld_u64(run, RUN_MMIO_PHYS)
        is_write = ld_u8(run, RUN_MMIO_IS_WRITE) != 0
        v = _load(run, RUN_MMIO_DATA, ln) if is_write else 0
        r, st = mmio_access(page_slot, regs, bytes_, msix, notify_fd, mmio_counts, pend, addr, ln, is_write, v)
        if st != ST_DONE:
            return R_SLOW_MMIO
        if not is_write:
            _store(run, RUN_MMIO_DATA, ln, r)
        return 0
    if reason == KVM_EXIT_INTR:
        ctl[V_INTR] += 1
        return 0
    if reason == KVM_EXIT_IRQ_WINDOW_OPEN:
        return 0
    if reason == KVM_EXIT_INTERNAL_ERROR:
        if assist(run, ast, ctl[V_EXITS]) == ASSIST_DONE:     # int3/fwait here
            return 0
        return VCPU_EXIT
    return VCPU_EXIT


# _nrt=False: no reference counting inside the loop.  Every array it
# touches is owned by the caller for the whole call and the loop allocates
# nothing, so the counts would only cost: with them, the inlined dispatch
# layers did ~30 atomic increments/decrements per exit, over 200 ns of a
# ~260 ns unclaimed-port exit (perf, bench pci's driver); without, ~20 ns.
# Callees that are not inlined (uart/cmos, the assists) keep their own
# counting, balanced within each call.
@njit(nogil=True, cache=True, _nrt=False)
def _vcpu_loop(fd, run, ctl, ast, pend, tb):
    """KVM_RUN on vCPU ``fd`` until an exit needs Python (see handle_exit),
    ctl[V_STOP] is set, a signal interrupts KVM_RUN or ctl[V_LIMIT] exits
    were handled.  nogil: device threads (and other vCPUs) run meanwhile."""
    conf, space, ports, kstate, page_slot, regs, bytes_, msix, notify_fd, port_counts, mmio_counts = tb
    while True:
        if ctl[V_STOP] != 0:
            return VCPU_STOPPED
        rc = sys_ioctl(fd, KVM_RUN, 0)
        if rc < 0:
            if rc == -EINTR:
                return VCPU_EINTR
            if rc == -EAGAIN:
                continue
            ctl[V_ERRNO] = -rc
            return VCPU_ERRNO
        ctl[V_EXITS] += 1
        code = handle_exit(run, ctl, ast, pend, conf, space, ports, kstate, page_slot, regs, bytes_, msix,
                           notify_fd, port_counts, mmio_counts)
        if code != 0:
            return code
        if ctl[V_EXITS] == ctl[V_LIMIT]:
            return VCPU_LIMIT


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _thread_times(tid: int) -> tuple[float, float]:
    """User and system CPU seconds of this process's thread ``tid`` (0s
    when it is gone), readable from any thread, unlike RUSAGE_THREAD."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def _summed(stats) -> ExitStats:
    """One ExitStats adding up several (every vCPU's)."""
    out = ExitStats()
    for st in stats:
        out.pio += st.pio
        out.mmio += st.mmio
        out.intr += st.intr
        out.total += st.total
        for k, n in st.assists.items():
            out.assists[k] = out.assists.get(k, 0) + n
    return out


def _from_disk_cache(kernel) -> bool:
    """True when ``kernel`` was loaded from Numba's disk cache in this
    process (False when compiled, or under NUMBA_DISABLE_JIT)."""
    stats = getattr(kernel, "stats", None)
    return stats is not None and sum(stats.cache_hits.values()) > 0


# ---------------------------------------------------------------------------
# The Python driver


class VcpuLoop:
    """What one vCPU's loop owns (nothing here is shared with another
    vCPU): the ``hw.kvm.KvmVcpu`` (fd, kvm_run page, assist state), the
    control array ``ctl``, the pending record ``pend``, the exit counters
    ``stats``, the thread running it and the halt poll's question."""

    def __init__(self, vm: "KvmVm", vcpu: KvmVcpu):
        self.vm = vm
        self.vcpu = vcpu
        self.index = vcpu.index
        self.ctl = np.zeros(V_FIELDS, dtype=np.int64)
        self.ctl[V_LIMIT] = -1
        self.pend = np.zeros(PD_FIELDS, dtype=np.int64)
        self.stats = ExitStats()
        self.thread = None              # threading.get_ident() of the thread in run()
        self.native_id = None           # its kernel thread id (--stats CPU time, the profiler's timer)
        self.halt_check = False         # the halt poll asks: is the vCPU parked (halted, IF clear)?
        self.parked = False             # its answer in the current round
        self.tables = None              # the bus's tables with this vCPU's own counter arrays
        self.cpu_s = [0.0, 0.0]         # user, system CPU seconds of its thread while running it
        self._live = None               # while run() runs: (thread id, its CPU times at the start)
        self._seen = None               # while _run() runs: the counters at its start (so_far)

    def stop(self) -> None:
        """Make the loop return before its next KVM_RUN, and a KVM_RUN in
        progress return (immediate_exit, then the kick signal)."""
        self.ctl[V_STOP] = 1
        if self.vcpu.run_map is not None and self.vm.immediate_exit_ok:
            self.vcpu.r8[RUN_IMMEDIATE_EXIT] = 1
        kick(self.thread)

    def run(self, max_exits) -> RunResult:
        """Run the vCPU on this thread until the guest or the launcher ends
        the run (see ``KvmVm.run``); its thread's CPU time is counted."""
        before = resource.getrusage(resource.RUSAGE_THREAD)
        tid = threading.get_native_id()
        self._live = (tid, _thread_times(tid))
        try:
            return self._run(max_exits)
        finally:
            self._live = None
            after = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu_s[0] += after.ru_utime - before.ru_utime
            self.cpu_s[1] += after.ru_stime - before.ru_stime

    def so_far(self) -> tuple[ExitStats, float, float]:
        """This vCPU's exits and its thread's user and system CPU seconds,
        a run in progress included (``stats`` and ``cpu_s`` take a run's
        share when it ends): what SIGUSR1's ``--stats`` reports mid-run.
        The running part is read from /proc (clock ticks) on any thread."""
        seen, live = self._seen, self._live
        out = ExitStats(pio=self.stats.pio, mmio=self.stats.mmio, intr=self.stats.intr, total=self.stats.total,
                        assists=dict(self.stats.assists))
        user, system = self.cpu_s
        if seen is not None:
            d = self.ctl[[V_PIO, V_MMIO, V_INTR, V_EXITS]] - seen[0]
            out.pio += int(d[0])
            out.mmio += int(d[1])
            out.intr += int(d[2])
            out.total += int(d[3])
            for name, k in zip(("fwait", "int3"), self.vcpu.assist[[AS_FWAIT, AS_INT3]] - seen[1]):
                if k:
                    out.assists[name] = out.assists.get(name, 0) + int(k)
        if live is not None:
            now = _thread_times(live[0])
            user += max(now[0] - live[1][0], 0.0)
            system += max(now[1] - live[1][1], 0.0)
        return out, user, system

    def _run(self, max_exits) -> RunResult:
        vm, ctl, stats, v = self.vm, self.ctl, self.stats, self.vcpu
        tables = self.tables
        start = ctl[V_EXITS]
        ctl[V_LIMIT] = start + max_exits if max_exits is not None else -1
        counted = [V_PIO, V_MMIO, V_INTR, V_EXITS]
        seen = ctl[counted].copy()
        seen_assists = v.assist[[AS_FWAIT, AS_INT3]].copy()
        self._seen = (seen, seen_assists)
        try:
            while True:
                if vm._stop:
                    # vCPU 0 says why the machine stopped; the others just stop.
                    return vm._stopped() if self.index == 0 else RunResult("stopped", "the machine stopped")
                code = _vcpu_loop(v.fd, v.run, ctl, v.assist, self.pend, tables)
                if code == R_SLOW_PIO:
                    self._finish_pio()
                elif code == R_SLOW_MMIO:
                    self._finish_mmio()
                elif code == VCPU_EINTR:
                    res = self._signalled()
                    if res is not None:
                        return res
                    continue
                elif code == VCPU_STOPPED:
                    if not vm._stop:         # a compiled handler asked (none does today): stop as asked
                        return RunResult("stopped", "the vCPU loop stopped")
                    continue
                elif code == VCPU_LIMIT:
                    return RunResult("stopped", f"{int(ctl[V_EXITS] - start)} exits handled (max_exits)")
                elif code == VCPU_ERRNO:
                    return RunResult("internal-error", f"KVM_RUN failed: {os.strerror(int(ctl[V_ERRNO]))}",
                                     vm.safe_regs(self.index))
                else:
                    res = self._python_exit()
                    if res is not None:
                        return res
                if ctl[V_EXITS] == ctl[V_LIMIT]:
                    return RunResult("stopped", f"{int(ctl[V_EXITS] - start)} exits handled (max_exits)")
        finally:
            self._seen = None
            d = ctl[counted] - seen
            stats.pio += int(d[0])
            stats.mmio += int(d[1])
            stats.intr += int(d[2])
            stats.total += int(d[3])
            for name, k in zip(("fwait", "int3"), v.assist[[AS_FWAIT, AS_INT3]] - seen_assists):
                if k:
                    stats.assists[name] = stats.assists.get(name, 0) + int(k)
            ctl[V_LIMIT] = -1

    def _signalled(self) -> RunResult | None:
        # KVM_RUN returned EINTR: count it, let _on_signal look, then answer
        # the halt poll's question if it asked.
        self.stats.intr += 1
        vm = self.vm
        vm._on_signal(self.index)
        if self.halt_check:
            self.halt_check = False
            self.parked = vm.parked(self.index)
            if self.parked and all(lp.parked for lp in vm.loops):
                return RunResult("halt", "the guest halted with interrupts disabled", vm.safe_regs(self.index))
        return None

    def _python_exit(self) -> RunResult | None:
        """An exit the compiled loop returned as VCPU_EXIT: the result that
        ends the run, or None to run on."""
        vm, v, i = self.vm, self.vcpu, self.index
        reason = v.r32[RUN_EXIT_REASON >> 2]
        if reason == KVM_EXIT_MMIO:
            ln, addr = v.r32[RUN_MMIO_LEN >> 2], v.r64[RUN_MMIO_PHYS >> 3]
            return RunResult("internal-error", f"MMIO access of {ln} bytes at {addr:#x}", vm.safe_regs(i))
        if reason == KVM_EXIT_IO:
            return RunResult("internal-error", f"port I/O exit of size {v.r8[RUN_IO_SIZE]} "
                             "that KVM should not send", vm.safe_regs(i))
        if reason == KVM_EXIT_INTERNAL_ERROR:
            return vm.internal_error(v, int(self.ctl[V_EXITS]), self.stats.assists)
        if reason == KVM_EXIT_HLT:
            return RunResult("halt", "the guest halted", vm.safe_regs(i))
        if reason == KVM_EXIT_SHUTDOWN:
            return RunResult("shutdown", "triple fault (KVM_EXIT_SHUTDOWN): the guest reset itself by faulting",
                             vm.safe_regs(i), vm.fetch_insn(vcpu=i))
        if reason == KVM_EXIT_SYSTEM_EVENT:
            t = v.r32[RUN_SYSEV_TYPE >> 2]
            if t == KVM_SYSTEM_EVENT_SHUTDOWN:
                return RunResult("poweroff", "the guest powered off")
            if t == KVM_SYSTEM_EVENT_RESET:
                return RunResult("reboot", "the guest asked for a reset")
            return RunResult("internal-error", f"system event {t} (crash)", vm.safe_regs(i))
        if reason == KVM_EXIT_FAIL_ENTRY:
            return RunResult("fail-entry", f"VM entry failed, hardware reason {v.r64[RUN_FAIL_REASON >> 3]:#x}",
                             vm.safe_regs(i))
        if reason == KVM_EXIT_IRQ_WINDOW_OPEN:
            return None
        return RunResult("unknown-exit", f"unhandled exit {EXIT_NAMES.get(reason, reason)}", vm.safe_regs(i))

    def _finish_pio(self) -> None:
        # The port access (a string one: each element) the loop stopped at,
        # ``pend[PD_INDEX]`` the element: that one straight to Python (it
        # was counted), the rest through the whole dispatch.
        run, bus = self.vcpu.run, self.vm.bus
        size = int(run[RUN_IO_SIZE])
        port = int(run[RUN_IO_PORT:RUN_IO_PORT + 2].view(np.uint16)[0])
        count = int(run[RUN_IO_COUNT:RUN_IO_COUNT + 4].view(np.uint32)[0])
        data = int(run[RUN_IO_DATA_OFFSET:RUN_IO_DATA_OFFSET + 8].view(np.uint64)[0])
        is_write = int(run[RUN_IO_DIRECTION]) == KVM_EXIT_IO_OUT
        first = int(self.pend[PD_INDEX])
        for i in range(first, count):
            at = data + i * size
            v = read_le(run, at, size) if is_write else 0
            r = bus.pio_python(port, size, is_write, v) if i == first else bus.pio(port, size, is_write, v)
            if not is_write:
                write_le(run, at, size, r)

    def _finish_mmio(self) -> None:
        run = self.vcpu.run
        ln = int(run[RUN_MMIO_LEN:RUN_MMIO_LEN + 4].view(np.uint32)[0])
        addr = int(run[RUN_MMIO_PHYS:RUN_MMIO_PHYS + 8].view(np.uint64)[0])
        is_write = bool(run[RUN_MMIO_IS_WRITE])
        v = read_le(run, RUN_MMIO_DATA, ln) if is_write else 0
        r = self.vm.bus.finish_mmio(self.pend, addr, ln, is_write, v)
        if not is_write:
            write_le(run, RUN_MMIO_DATA, ln, r)


class KvmVm(KvmVmBase):
    """A KVM machine whose vCPUs run in the compiled loop over ``bus`` (a
    ``pci.Bus``): ``hw.kvm.KvmVmBase`` (VM and vCPU fds, registers,
    interrupt routing) plus ``run``, ``stop`` and the reset port.  One
    ``VcpuLoop`` per vCPU in ``loops``: ``run`` drives vCPU 0 on the
    calling thread and each other vCPU on a thread of its own (``vcpuN``),
    all started together and all joined before ``run`` returns."""

    profiler = None     # a hw.profile.Profiler attached to this VM, or None

    def __init__(self, gm, bus=None, **kw):
        self.loops: list[VcpuLoop] = []
        self._stop = False
        self._timed_out = False
        self._reset_requested = False
        self._warming = None           # the thread loading the kernels Python calls on rare exits
        self._result = None            # the first result that ended the machine (any vCPU)
        self._result_lock = threading.Lock()
        self.first_run_at = None       # time.time() of the first KVM_RUN: start-up time in --stats
        super().__init__(gm, bus, **kw)
        self.loops = [VcpuLoop(self, v) for v in self.vcpus]

    @property
    def stats(self) -> ExitStats:
        """Exit counters of the whole machine: every vCPU's summed (each
        loop counts its own, see "Per vCPU and shared")."""
        if len(self.loops) == 1:
            return self.loops[0].stats
        return _summed(lp.stats for lp in self.loops)

    def stats_so_far(self) -> ExitStats:
        """``stats`` with the runs in progress included (VcpuLoop.so_far)."""
        return _summed(lp.so_far()[0] for lp in self.loops)

    def claim_reset_port(self) -> None:
        """Claim port 0x64 on the bus so the guest can reboot the PC way:
        0xFE written there pulses the reset line (Linux's ``reboot=k``, its
        default first try) and ``run`` returns "reboot".  Reads answer
        0xFF, exactly as the unclaimed port did ("no keyboard controller"),
        so i8042 probing is unchanged."""
        self.bus.add_kernel_ports(0x64, 1, self._reset_port, "reset")   # reads, other writes: compiled

    def _reset_port(self, port: int, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return (1 << (8 * size)) - 1
        if value & 0xFF == 0xFE:
            self._reset_requested = True
            self.stop()                    # the other vCPUs too: the reset line is the machine's
        return 0

    def stop(self) -> None:
        """Make ``run`` return "stopped" soon, from any thread: sets
        immediate_exit and kicks every vCPU thread out of KVM_RUN with a
        signal (the handler is installed when the first KvmVm is built on
        the main thread)."""
        self._stop = True
        for lp in self.loops:
            lp.stop()

    def run(self, timeout: float | None = None, max_exits: int | None = None,
            halt_poll: float | None = 1.0) -> RunResult:
        """Run every vCPU until the guest powers off, reboots, halts for
        good, faults fatally (any vCPU: the first such result is the
        machine's and stops the others), ``stop()`` is called, ``timeout``
        seconds pass or vCPU 0 handled ``max_exits`` exits.

        ``halt_poll``: every so many seconds each vCPU is kicked out of
        KVM_RUN to see whether it is parked (HLT with interrupts off, or an
        AP waiting for INIT); when all are, the run ends as "halt" (how
        Linux ends ``poweroff`` without ACPI).  One extra exit per vCPU per
        interval; None disables it."""
        if self.bus is None:
            raise RuntimeError("attach a bus before running the guest")
        lp = self.loops[0]
        self._stop = False
        self._timed_out = False
        self._result = None
        for other in self.loops:
            other.ctl[V_STOP] = 0
            other.halt_check = other.parked = False
            other.vcpu.r8[RUN_IMMEDIATE_EXIT] = 0
            if other.tables is None:
                other.tables = self.bus.tables if other.index == 0 else self.bus.vcpu_tables()
        lp.thread = threading.get_ident()
        lp.native_id = threading.get_native_id()
        self._load_kernels(lp)
        if self.first_run_at is None:
            self.first_run_at = time.time()
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self._timeout_kick)
            timer.daemon = True
            timer.start()
        done = threading.Event()
        poller = None
        if halt_poll:
            poller = threading.Thread(target=self._halt_poll, args=(halt_poll, done), name="kvm-halt-poll",
                                      daemon=True)
            poller.start()
        aps = [threading.Thread(target=self._run_ap, args=(other,), name=f"vcpu{other.index}", daemon=True)
               for other in self.loops[1:]]
        try:
            for t in aps:
                t.start()
            res = self._conclude(lp.run(max_exits))
        finally:
            # Whatever ended vCPU 0's loop ends the others': stop, kick, join.
            if aps:
                self.stop()
                for t in aps:
                    if t.ident is not None:
                        t.join()
            done.set()
            if poller is not None:
                poller.join()
            if timer is not None:
                timer.cancel()
            for other in self.loops:
                other.thread = None
                other.vcpu.r8[RUN_IMMEDIATE_EXIT] = 0
        # An AP's result that came in while the others were being stopped.
        return self._result if self._result is not None else res

    def _conclude(self, res: RunResult, vcpu: int = 0) -> RunResult:
        """Record ``res`` (vCPU ``vcpu``'s) as the machine's result unless an
        earlier one (or a plain stop) came first; stop every vCPU.  Returns
        the machine's result so far (vCPU 0's caller returns it)."""
        if res.reason != "stopped" and len(self.loops) > 1:
            res = RunResult(res.reason, f"vCPU {vcpu}: {res.message}", res.regs, res.insn)
        with self._result_lock:
            if self._result is None and res.reason != "stopped":
                self._result = res
        if len(self.loops) > 1:
            self.stop()
        return self._result if self._result is not None else res

    def _run_ap(self, lp: VcpuLoop) -> None:
        """vCPU ``lp.index``'s thread: the process's signals stay with the
        main thread (whose handlers act on them), only the kick reaches this
        one; whatever ends this loop ends the machine."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - {KICK_SIGNAL})
        lp.thread = threading.get_ident()
        lp.native_id = threading.get_native_id()
        prof = self.profiler
        if prof is not None and prof.running:            # vCPU 0's profile is on
            try:
                prof.start(vcpu=lp.index)       # its timer aimed at this thread
            except (ValueError, OSError):
                prof = None                     # vCPU 0's start would have failed the same way
        try:
            res = lp.run(None)
        except BaseException as exc:      # noqa: BLE001 - reported as the machine's end, never lost
            res = RunResult("internal-error", f"{type(exc).__name__}: {exc}")
        finally:
            if prof is not None:
                prof.stop(vcpu=lp.index)
        self._conclude(res, lp.index)

    def _load_kernels(self, lp: VcpuLoop) -> None:
        """Compile or load the loop before any timeout starts counting: one
        call that returns at once (stop set).  Then the kernels Python calls
        on rare exits load beside the guest (off the path to the first
        KVM_RUN, ~0.1 s of a start; the loop runs without the GIL)."""
        warm = lp.ctl.copy()
        warm[V_STOP] = 1
        v = lp.vcpu
        _vcpu_loop(v.fd, v.run, warm, v.assist, lp.pend, lp.tables)
        if self._warming is None:
            self._warming = threading.Thread(target=self.bus.compile_python_paths, name="bus-jit-load",
                                             daemon=True)
            self._warming.start()
            if not _from_disk_cache(_vcpu_loop):
                # A cold cache: they compile (seconds), and would hold
                # Numba's compiler lock against the device threads'
                # compiles mid-run.  Done now, as the loop just was.
                self._warming.join()

    def _timeout_kick(self):
        self._timed_out = True
        self.stop()

    def _on_signal(self, vcpu: int = 0) -> None:
        """A signal took vCPU ``vcpu``'s thread out of KVM_RUN (a kick:
        stop, the halt poll, or the profiler's timer): its registers are
        readable now, so this is where a profile sample is taken.  Runs on
        the vCPU's thread; the caller re-enters the guest."""
        if self.profiler is not None:
            self.profiler.sample(vcpu)

    def _halt_poll(self, interval: float, done: threading.Event) -> None:
        while not done.wait(interval):
            for lp in self.loops:           # a new round: every vCPU answers afresh
                lp.parked = False
                lp.halt_check = True
            for lp in self.loops:
                kick(lp.thread)

    def _stopped(self) -> RunResult:
        if self._reset_requested:
            self._reset_requested = False
            return RunResult("reboot", "reset through the keyboard controller (0xFE to port 0x64)")
        if self._timed_out:
            self._timed_out = False
            if self.halted_for_good():
                return RunResult("halt", "the guest halted with interrupts disabled", self.safe_regs())
            return RunResult("timeout", "the run timed out", self.safe_regs())
        return RunResult("stopped", "stop() was called")

    def close(self) -> None:
        if self._warming is not None:
            self._warming.join()           # a compile cut short by interpreter exit can crash it
        super().close()
