"""KVM backend: one VM, its vCPUs, the in-kernel IRQ chip and PIT, driven
from Python through raw ioctls (fcntl + ctypes structures, no compiled
extension).  This module holds what is KVM's: the VM and vCPU fds, each
vCPU's kvm_run page, register and event state, interrupt routing, and the
emulation assist; the ABI itself (ioctl numbers, structures, exit numbers,
kvm_run offsets) is ``hw.kvm_abi``.  The loop that runs a vCPU and answers
its exits is ``lguest_jit.vcpu`` (it dispatches into PCI, so it sits
above this layer; its ``KvmVm`` subclasses :class:`KvmVmBase`).

What the launcher does with it is what lguest's ``run_guest`` loop does,
with KVM doing the CPU part:

* guest RAM (a :class:`~lguest_jit.hw.memory.GuestMemory`) is one user
  memory slot at guest physical address 0;
* every port access and every access to an address with no memory slot
  (the PCI BARs above RAM) exits KVM_RUN to the vCPU loop;
* queue notifications never reach that loop: each notify address is an
  ioeventfd, so KVM signals the queue thread's eventfd directly;
* devices raise interrupts through irqfds, again without the vCPU thread;
* a handful of instructions the PVM in-kernel emulator rejects (``int3``,
  ``fwait``) are assisted here (``assist`` in compiled code,
  ``KvmVmBase.internal_error`` in Python), counted, and anything else is
  fatal.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import threading

import numpy as np

from .run import ExitStats, RunResult  # noqa: F401 - backend-neutral, re-exported for callers of kvm
from .x86 import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME,  # noqa: F401
                  EFER_SCE, MSR_EFER, MSR_FS_BASE, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
                  MSR_IA32_SYSENTER_ESP, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, RFLAGS_IF)

from numba import njit

from .firmware import with_apic_id, with_tsc_frequency
from .kvm_abi import *  # noqa: F401,F403 - the ABI, re-exported for callers of kvm
from .libc import sys_ioctl
from .memory import ld_u8, ld_u32


# Where KVM's real-mode helpers live: just below 4 GiB, above any PCI window
# we hand out and out of RAM (as QEMU and the notes place them).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

def kvm_available(path: str = "/dev/kvm") -> str | None:
    """None when KVM can be used here, else the reason it cannot (for skips)."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        v = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if v != KVM_API_VERSION:
            return f"KVM API version {v}, need {KVM_API_VERSION}"
    except OSError as e:
        return f"{path} is not a KVM device: {e.strerror}"
    finally:
        os.close(fd)
    return None


def guest_tsc(path: str = "/dev/kvm") -> tuple[str, int]:
    """(CPU vendor, TSC kHz) that a vCPU made here gets: the vendor string of
    KVM_GET_SUPPORTED_CPUID's leaf 0 and KVM_GET_TSC_KHZ of a throwaway VM's
    vCPU (a few ms), before the guest's command line is written.  ("", 0)
    when KVM will not say."""
    fds = []
    try:
        kvm = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)

        def entries(n):
            class _cpuid(ctypes.Structure):
                _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]
            buf = _cpuid()
            buf.nent = n
            return buf
        buf = ioctl_growing(kvm, KVM_GET_SUPPORTED_CPUID, entries, "KVM_GET_SUPPORTED_CPUID", limit=4096)
        leaf0 = next((buf.entries[i] for i in range(buf.nent) if buf.entries[i].function == 0), None)
        vendor = "" if leaf0 is None else (int(leaf0.ebx).to_bytes(4, "little") + int(leaf0.edx).to_bytes(4, "little")
                                           + int(leaf0.ecx).to_bytes(4, "little")).decode("latin-1")
        vm = ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        fds.append(vm)
        vcpu = ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        fds.append(vcpu)
        try:
            khz = fcntl.ioctl(vcpu, KVM_GET_TSC_KHZ, 0)
        except OSError:
            khz = 0
        return vendor, max(int(khz), 0)
    except OSError:
        return "", 0
    finally:
        for fd in reversed(fds):
            os.close(fd)


# ---------------------------------------------------------------------------
# Results of a run


# The instructions we step over for the emulator.  Each entry: leading bytes
# -> (name, length, action).  Narrow on purpose: anything else is fatal.
#   fwait (0x9B): waits for pending x87 exceptions; with none pending it is a
#     no-op, and the guest never unmasks x87 exceptions we could lose.
#   int3 (0xCC): a trap; the return address is the next instruction, so
#     advance RIP by one and inject #BP (vector 3) as an event.
ASSISTS = {
    b"\x9b": ("fwait", 1, "skip"),
    b"\xcc": ("int3", 1, "bp"),
}
ASSIST_REPEAT_LIMIT = 16   # the same RIP assisted this often with no other exit between: a loop

# The assist's state, per vCPU: one int64 array (``KvmVcpu.assist``) that
# the compiled ``assist`` and ``KvmVmBase.internal_error`` share.
AS_FD = 0            # the vCPU fd (for the register ioctls)
AS_FWAIT = 1         # assists done in compiled code, per instruction
AS_INT3 = 2
AS_EXIT = 3          # repeat detection (both paths): exit number of the last assist,
AS_REPEAT = 4        # how often in a row with the same registers,
AS_PREV_REGS = 8     # and those registers (struct kvm_regs, 18 words)
AS_REGS = 26         # scratch: struct kvm_regs for KVM_GET/SET_REGS
AS_EVENTS = 44       # scratch: struct kvm_vcpu_events (64 bytes)
AS_FIELDS = 52
ASSIST_DONE = 0      # assist results: assisted, the vCPU runs on
ASSIST_PYTHON = 1    # not assisted, nothing changed: Python decides (internal_error)




@njit(nogil=True, cache=True)
def assist(run, st, n):
    """The emulation assist for the KVM_EXIT_INTERNAL_ERROR in ``run`` (exit
    number ``n``; ``st``: the vCPU's AS_* state), in compiled code when KVM
    passed the instruction bytes and they are one of ASSISTS: RIP += 1, and
    for int3 #BP injected.  Returns ASSIST_DONE, or ASSIST_PYTHON when
    Python must decide (anything else, an exception already pending, the
    repeat limit reached, a failed ioctl) -- having changed nothing, so
    ``KvmVmBase.internal_error`` sees the same state."""
    if (ld_u32(run, RUN_INT_SUBERROR) != KVM_INTERNAL_ERROR_EMULATION or ld_u32(run, RUN_INT_NDATA) < 3
            or (ld_u8(run, RUN_INT_FLAGS) & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
            or ld_u8(run, RUN_INT_INSN_SIZE) < 1):
        return ASSIST_PYTHON
    op = ld_u8(run, RUN_INT_INSN)
    if op != 0x9B and op != 0xCC:
        return ASSIST_PYTHON
    fd = st[AS_FD]
    base = st.ctypes.data
    if sys_ioctl(fd, KVM_GET_REGS, base + 8 * AS_REGS) < 0:
        return ASSIST_PYTHON
    same = n == st[AS_EXIT] + 1
    for i in range(18):
        if st[AS_REGS + i] != st[AS_PREV_REGS + i]:
            same = False
    if same and st[AS_REPEAT] + 1 >= ASSIST_REPEAT_LIMIT:
        return ASSIST_PYTHON
    if op == 0xCC:
        if sys_ioctl(fd, KVM_GET_VCPU_EVENTS, base + 8 * AS_EVENTS) < 0:
            return ASSIST_PYTHON
        ex = st[AS_EVENTS]
        if (ex & 0xFF) != 0 or ((ex >> 24) & 0xFF) != 0:      # exception injected or pending
            return ASSIST_PYTHON
    if same:
        st[AS_REPEAT] += 1
    else:
        for i in range(18):
            st[AS_PREV_REGS + i] = st[AS_REGS + i]
        st[AS_REPEAT] = 1
    st[AS_EXIT] = n
    st[AS_REGS + 16] += 1                                      # rip: both are one byte long
    if sys_ioctl(fd, KVM_SET_REGS, base + 8 * AS_REGS) < 0:
        return ASSIST_PYTHON
    if op == 0xCC:
        # exception {injected 1, nr 3, no error code}; flags (bytes 20-23) 0
        st[AS_EVENTS] = 1 | (3 << 8)
        st[AS_EVENTS + 2] &= 0xFFFFFFFF
        if sys_ioctl(fd, KVM_SET_VCPU_EVENTS, base + 8 * AS_EVENTS) < 0:
            return ASSIST_PYTHON
        st[AS_INT3] += 1
    else:
        st[AS_FWAIT] += 1
    return ASSIST_DONE


# ---------------------------------------------------------------------------
# Page-table walking (for reading instruction bytes at a virtual RIP)


def translate(read_u64, read_u32, sregs: kvm_sregs, vaddr: int) -> int | None:
    """Guest-physical address of linear address ``vaddr`` under the guest's
    paging mode, or None if it is not mapped (or a table lies outside RAM).

    ``read_u64(gpa)`` / ``read_u32(gpa)`` return a table entry or None when
    ``gpa`` is outside guest RAM.  Handles no paging, 32-bit non-PAE (4 KiB
    and 4 MiB pages), PAE and 4-level long mode (4 KiB, 2 MiB, 1 GiB).
    Permission bits are ignored: we only fetch bytes the guest just tried to
    execute.
    """
    cr0, cr4, efer, cr3 = sregs.cr0, sregs.cr4, sregs.efer, sregs.cr3
    if not cr0 & CR0_PG:
        return vaddr & 0xFFFFFFFF if not efer & EFER_LMA else vaddr
    addr_mask = 0x000FFFFFFFFFF000
    if efer & EFER_LMA:
        table = cr3 & addr_mask
        for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
            e = read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
            if e is None or not e & 1:
                return None
            if level in (3, 2) and e & 0x80:   # 1 GiB / 2 MiB page
                size = 1 << shift
                return (e & addr_mask & ~(size - 1)) | (vaddr & (size - 1))
            table = e & addr_mask
        return table | (vaddr & 0xFFF)
    vaddr &= 0xFFFFFFFF
    if cr4 & CR4_PAE:
        e = read_u64((cr3 & 0xFFFFFFE0) + ((vaddr >> 30) & 3) * 8)
        if e is None or not e & 1:
            return None
        table = e & addr_mask
        for level, shift in ((2, 21), (1, 12)):
            e = read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
            if e is None or not e & 1:
                return None
            if level == 2 and e & 0x80:
                return (e & addr_mask & ~0x1FFFFF) | (vaddr & 0x1FFFFF)
            table = e & addr_mask
        return table | (vaddr & 0xFFF)
    e = read_u32((cr3 & 0xFFFFF000) + (vaddr >> 22) * 4)
    if e is None or not e & 1:
        return None
    if e & 0x80 and cr4 & CR4_PSE:   # 4 MiB page (bits 13..20 are PA bits 32..39)
        return (e & 0xFFC00000) | ((e >> 13) & 0xFF) << 32 | (vaddr & 0x3FFFFF)
    e = read_u32((e & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4)
    if e is None or not e & 1:
        return None
    return (e & 0xFFFFF000) | (vaddr & 0xFFF)


# ---------------------------------------------------------------------------
# The kick signal: a no-op handler whose only job is to make a blocked
# KVM_RUN return EINTR in the vCPU thread.

KICK_SIGNAL = signal.SIGRTMIN + 1
_kick_installed = False


def _install_kick_handler() -> None:
    global _kick_installed
    if _kick_installed:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True
    elif signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        _kick_installed = True
    # Otherwise stop() still works through immediate_exit, but only once the
    # vCPU exits for another reason; lguest_jit.vcpu.KvmVm.stop documents this.


def kick(thread_ident: int | None) -> None:
    """Make a KVM_RUN blocked in thread ``thread_ident`` return EINTR."""
    if thread_ident is not None and _kick_installed:
        try:
            signal.pthread_kill(thread_ident, KICK_SIGNAL)
        except (ProcessLookupError, OSError):
            pass


# ---------------------------------------------------------------------------
# A vCPU and the VM


class KvmVcpu:
    """One vCPU as KVM gives it: its fd, its kvm_run page (mapped once: a
    numpy view ``run`` for compiled code, memoryviews ``r8``..``r64`` of
    each width for Python, so an exit costs indexings, not objects) and the
    assist's state (``assist``, AS_* fields).  All of it belongs to this
    vCPU alone; a second vCPU gets its own."""

    def __init__(self, kvm_fd: int, vm_fd: int, index: int, own):
        self.index = index
        self.fd = own(ioctl(vm_fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU"))
        size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self.run_map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.r8 = memoryview(self.run_map)
        self.r16 = self.r8.cast("H")
        self.r32 = self.r8.cast("I")
        self.r64 = self.r8.cast("Q")
        self.run = np.frombuffer(self.run_map, dtype=np.uint8)
        self.assist = np.zeros(AS_FIELDS, dtype=np.int64)
        self.assist[AS_FD] = self.fd
        self.assist[AS_EXIT] = -2

    def close(self) -> None:
        """Unmap kvm_run (the fd is closed by the VM that owns it)."""
        self.run = None
        for name in ("r64", "r32", "r16", "r8"):
            mv = getattr(self, name, None)
            if mv is not None:
                mv.release()
                setattr(self, name, None)
        if self.run_map is not None:
            self.run_map.close()
            self.run_map = None


class KvmVmBase:
    """One KVM virtual machine over ``gm`` with ``cpus`` vCPUs (``vcpus[i]``,
    KVM vCPU id and local APIC id i; the register methods act on vCPU 0
    unless given ``vcpu=i``, and only from the thread running it, or while
    it is stopped: an ioctl on a vCPU in KVM_RUN blocks until it exits), exits handed to ``bus`` by the vCPU loop
    (``lguest_jit.vcpu.KvmVm``, which adds ``run``/``stop``).

    What this class asks of ``bus`` (``attach_bus``): ``ioeventfds()``,
    ``interrupts()``, ``irq_pending(line)`` and, when offered,
    ``msi_routes()``; the loop dispatches exits over its tables.
    ``cpuid_hook(entries)`` may edit the list of ``kvm_cpuid_entry2``
    before KVM_SET_CPUID2.  ``irq_mode`` forces how device interrupts reach
    the irqchip: "resample" (level: KVM_IRQFD + resamplefd), "irqfd"
    (edge pulse per eventfd write), "line" (a Python thread reads each
    eventfd and calls KVM_IRQ_LINE), or None to choose (see ``attach_bus``).
    """

    def __init__(self, gm, bus=None, *, cpuid_hook=None, irq_mode: str | None = None,
                 device: str = "/dev/kvm", cpus: int = 1):
        self.gm = gm
        self.bus = None
        self.irq_mode = None
        self._fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self.vcpus: list[KvmVcpu] = []
        self._closed = False
        self._ioeventfds: list[tuple[int, int, int, int]] = []
        self._bus_ioeventfds: set[tuple[int, int, int]] = set()   # the subset bus.ioeventfds() asked for
        self._irqfds: list[tuple[int, int, int]] = []      # (gsi, fd, resamplefd or -1)
        self._msi_routes = None       # the MSI part of the last KVM_SET_GSI_ROUTING
        self.n_route_updates = 0
        self._pipe_r = self._pipe_w = -1
        self.run_map = None
        try:
            self.kvm_fd = self._own(os.open(device, os.O_RDWR | os.O_CLOEXEC))
            v = ioctl(self.kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if v != KVM_API_VERSION:
                raise KvmError(errno.EINVAL, f"KVM API version {v}, need {KVM_API_VERSION}")
            for cap, name in ((KVM_CAP_IRQCHIP, "IRQCHIP"), (KVM_CAP_USER_MEMORY, "USER_MEMORY"),
                              (KVM_CAP_SET_TSS_ADDR, "SET_TSS_ADDR"), (KVM_CAP_PIT2, "PIT2"),
                              (KVM_CAP_EXT_CPUID, "EXT_CPUID")):
                if not self.check_extension(cap):
                    raise KvmError(errno.ENOSYS, f"KVM lacks KVM_CAP_{name}")
            self.vm_fd = self._own(ioctl(self.kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM"))
            ioctl(self.vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            if self.check_extension(KVM_CAP_SET_IDENTITY_MAP_ADDR):
                ioctl(self.vm_fd, KVM_SET_IDENTITY_MAP_ADDR, u64(IDENTITY_MAP_ADDR), "KVM_SET_IDENTITY_MAP_ADDR")
            ioctl(self.vm_fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
            pit = kvm_pit_config(flags=KVM_PIT_SPEAKER_DUMMY)
            ioctl(self.vm_fd, KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
            region = kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                                 memory_size=gm.size, userspace_addr=gm.base)
            ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            # Every vCPU before the first KVM_RUN, each with its CPUID (a
            # vCPU has none until KVM_SET_CPUID2) naming its own APIC id.
            # KVM's defaults do the rest: local APIC id i, the BSP flag in
            # the APIC-base MSR on vCPU 0 only, vCPUs 1.. waiting for INIT/SIPI.
            for i in range(cpus):
                self.vcpus.append(KvmVcpu(self.kvm_fd, self.vm_fd, i, self._own))
            self.vcpu_fd = self.vcpus[0].fd
            self.run_map = self.vcpus[0].run_map
            for i in range(cpus):
                self._set_cpuid(cpuid_hook, i)
            self.immediate_exit_ok = bool(self.check_extension(KVM_CAP_IMMEDIATE_EXIT))
            _install_kick_handler()
            if irq_mode not in (None, "resample", "irqfd", "line"):
                raise ValueError(f"irq_mode must be resample, irqfd, line or None, not {irq_mode!r}")
            self._irq_mode_request = irq_mode
            if bus is not None:
                self.attach_bus(bus)
        except BaseException:
            self.close()
            raise

    # -- small helpers ------------------------------------------------------

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def check_extension(self, cap: int) -> int:
        fd = getattr(self, "vm_fd", None) or self.kvm_fd
        try:
            return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def _cpuid_buffer(self, nent: int):
        class _cpuid(ctypes.Structure):
            _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]
        buf = _cpuid()
        buf.nent = nent
        return buf

    def supported_cpuid(self) -> list:
        """KVM_GET_SUPPORTED_CPUID as a list of kvm_cpuid_entry2."""
        buf = ioctl_growing(self.kvm_fd, KVM_GET_SUPPORTED_CPUID, self._cpuid_buffer, "KVM_GET_SUPPORTED_CPUID",
                            limit=4096)
        return [buf.entries[i] for i in range(buf.nent)]

    def vcpu_cpuid(self) -> list:
        """KVM_GET_CPUID2: what the vCPU really has (kvm_pvm adds bits back)."""
        buf = self._cpuid_buffer(256)
        ioctl(self.vcpu_fd, KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [buf.entries[i] for i in range(buf.nent)]

    def tsc_khz(self) -> int:
        """The guest TSC's frequency (KVM_GET_TSC_KHZ), 0 if KVM won't say."""
        try:
            return fcntl.ioctl(self.vcpu_fd, KVM_GET_TSC_KHZ, 0)
        except OSError:
            return 0

    def _set_cpuid(self, hook, vcpu: int = 0) -> None:
        # With the TSC frequency in CPUID the guest skips calibrating it
        # against the PIT; the APIC id is vCPU 0's, not the host CPU's
        # KVM_GET_SUPPORTED_CPUID reports (hw/firmware.py).
        entries = with_apic_id(with_tsc_frequency(self.supported_cpuid(), self.tsc_khz()), vcpu)
        if hook is not None:
            entries = list(hook(entries))
        buf = self._cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.vcpus[vcpu].fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    # -- registers ------------------------------------------------------------

    def get_regs(self, vcpu: int = 0) -> kvm_regs:
        r = kvm_regs()
        ioctl(self.vcpus[vcpu].fd, KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: kvm_regs, vcpu: int = 0) -> None:
        ioctl(self.vcpus[vcpu].fd, KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self, vcpu: int = 0) -> kvm_sregs:
        s = kvm_sregs()
        ioctl(self.vcpus[vcpu].fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: kvm_sregs, vcpu: int = 0) -> None:
        ioctl(self.vcpus[vcpu].fd, KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def get_events(self, vcpu: int = 0) -> kvm_vcpu_events:
        ev = kvm_vcpu_events()
        ioctl(self.vcpus[vcpu].fd, KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_events(self, ev: kvm_vcpu_events, vcpu: int = 0) -> None:
        ioctl(self.vcpus[vcpu].fd, KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def transfer_msrs(self, request: int, items, vcpu: int = 0) -> list:
        """One KVM_GET_MSRS or KVM_SET_MSRS (``request``) over ``items``, a
        list of (index, value): the (index, value) entries KVM got through,
        in order.  KVM stops at the first MSR it refuses, so a shorter list
        names that one as ``items[len(result)]``."""
        items = list(items)

        class _msrs(ctypes.Structure):
            _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * max(len(items), 1))]
        buf = _msrs(nmsrs=len(items))
        for i, (idx, val) in enumerate(items):
            buf.entries[i].index = idx
            buf.entries[i].data = val & 0xFFFFFFFFFFFFFFFF
        name = "KVM_GET_MSRS" if request == KVM_GET_MSRS else "KVM_SET_MSRS"
        n = ioctl(self.vcpus[vcpu].fd, request, buf, name)
        return [(buf.entries[i].index, buf.entries[i].data) for i in range(n)]

    def get_msrs(self, indices) -> dict:
        """KVM_GET_MSRS: {index: value}.  KVM stops at the first MSR it does
        not know; that is an error here, naming the MSR."""
        indices = list(indices)
        done = self.transfer_msrs(KVM_GET_MSRS, [(i, 0) for i in indices])
        if len(done) != len(indices):
            raise KvmError(errno.EINVAL, f"KVM_GET_MSRS: MSR {indices[len(done)]:#x} is not supported")
        return dict(done)

    def set_msrs(self, values: dict) -> None:
        """KVM_SET_MSRS from {index: value}; an MSR KVM refuses is an error
        naming it (KVM returns how many it set before stopping)."""
        items = list(values.items())
        n = len(self.transfer_msrs(KVM_SET_MSRS, items))
        if n != len(items):
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {items[n][0]:#x} = {items[n][1]:#x} was refused")

    def make_runnable(self, vcpu: int = 0) -> None:
        """Leave a HLT state (KVM_SET_MP_STATE RUNNABLE): needed before
        running new code on a vCPU that halted."""
        ioctl(self.vcpus[vcpu].fd, KVM_SET_MP_STATE, kvm_mp_state(KVM_MP_STATE_RUNNABLE), "KVM_SET_MP_STATE")

    def regs_dict(self, vcpu: int = 0) -> dict:
        r = self.get_regs(vcpu)
        d = {n: getattr(r, n) for n, _ in kvm_regs._fields_}
        if len(self.vcpus) > 1:
            d["vcpu"] = vcpu
        try:
            s = self.get_sregs(vcpu)
            d.update(cs=s.cs.selector, cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, efer=s.efer)
        except OSError:
            pass
        return d

    # -- boot state -------------------------------------------------------------

    def setup_boot(self, info) -> None:
        """Registers for a :class:`lguest_jit.hw.loader.BootInfo`: CR0/CR3/
        CR4/EFER, GDTR, the hidden CS and DS/ES/FS/GS/SS state exactly as the
        loader computed them (long mode: 64-bit CS, paging on its identity
        page tables; protected mode: flat segments, paging off), RIP =
        ``entry``, RSI = ``boot_params``, other GPRs 0 (x86 boot protocol,
        boot.rst), RFLAGS as given (interrupts off)."""
        if info.mode not in ("long", "protected"):
            raise ValueError(f"boot mode must be 'long' or 'protected', not {info.mode!r}")
        if info.mode == "long" and info.cr3 is None:
            raise ValueError("a long-mode BootInfo needs cr3 (the loader's page tables)")
        s = self.get_sregs()
        s.cs = _segment(info.code)
        s.ds = s.es = s.fs = s.gs = s.ss = _segment(info.data)
        s.gdt.base, s.gdt.limit = info.gdt_base, info.gdt_limit
        s.cr0, s.cr4, s.efer = info.cr0, info.cr4, info.efer
        if info.cr3 is not None:
            s.cr3 = info.cr3
        self.set_sregs(s)
        self.make_runnable()
        r = kvm_regs()
        r.rip = info.entry
        r.rsi = info.boot_params
        r.rflags = info.rflags
        self.set_regs(r)

    # -- the bus -----------------------------------------------------------------

    def attach_bus(self, bus) -> None:
        """Connect ``bus``: every ``bus.ioeventfds()`` entry becomes a
        KVM_IOEVENTFD (MMIO, no datamatch), every ``bus.interrupts()`` (line,
        eventfd) pair an irqfd on that GSI.

        Interrupt delivery: PCI INTx is level-triggered, KVM's plain irqfd
        only pulses the line.  With ``bus.irq_pending`` available and
        KVM_CAP_IRQFD_RESAMPLE, the line is held asserted until the guest
        EOIs; KVM then signals the resample eventfd and a small thread
        re-raises the line if the device still has its ISR set.  Without
        ``irq_pending`` a pulse per raise is used (the in-kernel PIC latches
        edges).  If KVM_IRQFD itself fails, a thread reads each eventfd and
        pulses the line with KVM_IRQ_LINE.
        """
        self.bus = bus
        self.sync_ioeventfds()
        # The bus is above us in the layers: it calls back, we never import it.
        listen = getattr(bus, "add_decode_listener", None)
        if listen is not None:
            listen(self.sync_ioeventfds)
        irqs = list(bus.interrupts()) if hasattr(bus, "interrupts") else []
        mode = self._irq_mode_request
        if mode is None:
            if not self.check_extension(KVM_CAP_IRQFD):
                mode = "line"
            elif hasattr(bus, "irq_pending") and self.check_extension(KVM_CAP_IRQFD_RESAMPLE):
                mode = "resample"
            else:
                mode = "irqfd"
        self.irq_mode = mode
        self._attach_msi(bus)
        line_fds = []
        for line, efd in irqs:
            if mode == "line":
                line_fds.append((line, efd))
                continue
            resample = -1
            if mode == "resample":
                resample = self._own(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            try:
                self.add_irqfd(line, efd, resample)
            except KvmError:
                if resample >= 0:
                    self._fds.remove(resample)
                    os.close(resample)
                self.irq_mode = "line"
                line_fds.append((line, efd))
        resamplers = [(g, f, r) for g, f, r in self._irqfds if r >= 0]
        if resamplers or line_fds:
            self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._fds += [self._pipe_r, self._pipe_w]
            t = threading.Thread(target=self._irq_thread, args=(resamplers, line_fds),
                                 name="kvm-irq", daemon=True)
            t.start()
            self._threads.append(t)

    def _attach_msi(self, bus) -> None:
        """MSI-X: bind vector i of ``bus.msi_routes()`` to GSI MSI_GSI_BASE + i
        with an irqfd for good, and keep the routes equal to the tables
        (``bus.add_msi_listener``).  Needs KVM_CAP_IRQ_ROUTING and irqfds: a
        bus that offers MSI-X here must be able to deliver it."""
        routes = list(bus.msi_routes()) if hasattr(bus, "msi_routes") else []
        if not routes:
            return
        for cap, name in ((KVM_CAP_IRQ_ROUTING, "IRQ_ROUTING"), (KVM_CAP_IRQFD, "IRQFD")):
            if not self.check_extension(cap):
                raise KvmError(errno.ENOSYS, f"KVM lacks KVM_CAP_{name}, which MSI-X delivery needs")
        self.sync_msi_routes()
        for i, (efd, _, _) in enumerate(routes):
            self.add_irqfd(MSI_GSI_BASE + i, efd)
        bus.add_msi_listener(self.sync_msi_routes)

    def set_gsi_routing(self, msi: list[tuple[int, int, int]]) -> None:
        """KVM_SET_GSI_ROUTING: the default irqchip routes plus one MSI route
        per (gsi, address, data) in ``msi``."""
        chips = default_irq_routes()
        n = len(chips) + len(msi)

        class _routing(ctypes.Structure):
            _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]
        buf = _routing()
        buf.nr = n
        for i, (gsi, chip, pin) in enumerate(chips):
            e = buf.entries[i]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        for i, (gsi, address, data) in enumerate(msi, len(chips)):
            e = buf.entries[i]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo, e.u.msi.address_hi = address & 0xFFFFFFFF, address >> 32
            e.u.msi.data = data & 0xFFFFFFFF
        ioctl(self.vm_fd, KVM_SET_GSI_ROUTING, buf, "KVM_SET_GSI_ROUTING")
        self.n_route_updates += 1

    def sync_msi_routes(self) -> None:
        """Make KVM's MSI routes the bus's current messages (called by the
        bus before a vector can send on a changed route).  Vectors of
        disabled functions, and messages that address no local APIC, get no
        route: their irqfd then delivers nothing."""
        msi = [(MSI_GSI_BASE + i, address, data) for i, (_, address, data) in enumerate(self.bus.msi_routes())
               if msi_deliverable(address)]
        if msi != self._msi_routes:
            self.set_gsi_routing(msi)
            self._msi_routes = msi

    def signal_msi(self, address: int, data: int) -> None:
        """KVM_SIGNAL_MSI: inject one message directly (tests, probes)."""
        arg = kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data & 0xFFFFFFFF)
        ioctl(self.vm_fd, KVM_SIGNAL_MSI, arg, "KVM_SIGNAL_MSI")

    def add_ioeventfd(self, gpa: int, length: int, efd: int, pio: bool = False) -> None:
        """Guest writes of ``length`` bytes (0: any length) at ``gpa`` signal
        ``efd`` inside KVM, without an exit to this loop."""
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length}")
        if length == 0 and not self.check_extension(KVM_CAP_IOEVENTFD_ANY_LENGTH):
            raise KvmError(errno.ENOSYS, "KVM lacks KVM_CAP_IOEVENTFD_ANY_LENGTH for a length-0 ioeventfd")
        flags = KVM_IOEVENTFD_FLAG_PIO if pio else 0
        arg = kvm_ioeventfd(datamatch=0, addr=gpa, len=length, fd=efd, flags=flags)
        ioctl(self.vm_fd, KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")
        self._ioeventfds.append((gpa, length, efd, flags))

    def remove_ioeventfd(self, gpa: int, length: int, efd: int, pio: bool = False) -> None:
        """Undo ``add_ioeventfd`` with the same arguments."""
        flags = KVM_IOEVENTFD_FLAG_PIO if pio else 0
        arg = kvm_ioeventfd(datamatch=0, addr=gpa, len=length, fd=efd, flags=flags | KVM_IOEVENTFD_FLAG_DEASSIGN)
        ioctl(self.vm_fd, KVM_IOEVENTFD, arg, "KVM_IOEVENTFD (deassign)")
        self._ioeventfds.remove((gpa, length, efd, flags))

    def sync_ioeventfds(self) -> None:
        """Make the MMIO ioeventfds taken from the bus exactly
        ``bus.ioeventfds()`` now: called at attach and by the bus whenever
        BAR decoding changes, so every queue's notify address follows its
        BAR0 (and a BAR hidden under another decodes no notify)."""
        want = set(self.bus.ioeventfds()) if hasattr(self.bus, "ioeventfds") else set()
        have = self._bus_ioeventfds
        # Deassign first: KVM refuses a second eventfd on an address in use.
        for gpa, length, efd in sorted(have - want):
            self.remove_ioeventfd(gpa, length, efd)
        self._bus_ioeventfds = have & want
        for gpa, length, efd in sorted(want - have):
            try:
                self.add_ioeventfd(gpa, length, efd)
            except KvmError:
                # The guest chose the address (a BAR move): never fatal.
                # Unregistered, the notify exits to bus.mmio, which signals
                # the same eventfd.
                continue
            self._bus_ioeventfds.add((gpa, length, efd))

    def add_irqfd(self, gsi: int, efd: int, resamplefd: int = -1) -> None:
        """Writes to ``efd`` raise ``gsi``: a pulse, or with ``resamplefd`` a
        level held until the guest EOIs (then ``resamplefd`` is signalled)."""
        arg = kvm_irqfd(fd=efd, gsi=gsi, flags=KVM_IRQFD_FLAG_RESAMPLE if resamplefd >= 0 else 0,
                        resamplefd=max(resamplefd, 0))
        ioctl(self.vm_fd, KVM_IRQFD, arg, "KVM_IRQFD")
        self._irqfds.append((gsi, efd, resamplefd))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.vm_fd, KVM_IRQ_LINE, kvm_irq_level(irq=irq, level=level), "KVM_IRQ_LINE")

    def _irq_thread(self, resamplers, line_fds) -> None:
        """Resample: re-raise a line still pending after the guest's EOI.
        Line: pulse the line for each eventfd write (the fallback path)."""
        by_fd = {}
        for gsi, efd, rfd in resamplers:
            by_fd[rfd] = ("resample", gsi, efd)
        for line, efd in line_fds:
            os.set_blocking(efd, False)
            by_fd[efd] = ("line", line, efd)
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._pipe_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._pipe_r:
                    return
                kind, gsi, efd = by_fd[fd]
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                try:
                    if kind == "line":
                        self.irq_line(gsi, 1)
                        self.irq_line(gsi, 0)
                    elif self.bus.irq_pending(gsi):
                        os.eventfd_write(efd, 1)
                except OSError:
                    return

    def halted_for_good(self, vcpu: int = 0) -> bool:
        """True when the vCPU sits in HLT with IF clear.  With the in-kernel
        irqchip such a HLT never exits KVM_RUN (KVM blocks the vCPU in the
        kernel waiting for an interrupt that cannot be taken), so the loop
        asks after a kick instead.  Only call it from the vCPU thread."""
        st = kvm_mp_state()
        ioctl(self.vcpus[vcpu].fd, KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state == KVM_MP_STATE_HALTED and not self.get_regs(vcpu).rflags & RFLAGS_IF

    def parked(self, vcpu: int) -> bool:
        """True when the vCPU can run nothing more on its own: halted with
        IF clear, or an AP still (or again) waiting for INIT/SIPI.  The
        machine has halted when every vCPU is parked.  From the vCPU's
        thread only, as ``halted_for_good``."""
        st = kvm_mp_state()
        ioctl(self.vcpus[vcpu].fd, KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        if st.mp_state in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED):
            return True
        return st.mp_state == KVM_MP_STATE_HALTED and not self.get_regs(vcpu).rflags & RFLAGS_IF

    def complete_pending(self) -> None:
        """Finish what each vCPU's last exit left for its next KVM_RUN (an
        IN's value into RAX, an MMIO read's into its register, RIP past the
        instruction): one KVM_RUN with immediate_exit set returns EINTR
        without running guest code, after that completion (KVM's API, on
        saving state).  A vCPU stopped between handling an exit and
        re-entering would otherwise be saved mid-instruction.  Every vCPU
        must be out of KVM_RUN (no thread running it)."""
        if not self.immediate_exit_ok:
            return
        for v in self.vcpus:
            v.r8[RUN_IMMEDIATE_EXIT] = 1
            try:
                fcntl.ioctl(v.fd, KVM_RUN, 0)
            except OSError as exc:
                if exc.errno not in (errno.EINTR, errno.EAGAIN):
                    raise KvmError(exc.errno, f"KVM_RUN (completing vCPU {v.index}'s last exit): "
                                   f"{os.strerror(exc.errno)}") from None
            finally:
                v.r8[RUN_IMMEDIATE_EXIT] = 0

    def safe_regs(self, vcpu: int = 0) -> dict | None:
        """``regs_dict(vcpu)``, or None when the registers cannot be read."""
        try:
            return self.regs_dict(vcpu)
        except OSError:
            return None

    # -- emulation assists ------------------------------------------------------------

    def _read_u64(self, gpa):
        return int.from_bytes(self.gm.read(gpa, 8), "little") if self.gm.check(gpa, 8) else None

    def _read_u32(self, gpa):
        return int.from_bytes(self.gm.read(gpa, 4), "little") if self.gm.check(gpa, 4) else None

    def fetch_insn(self, length: int = 15, sregs: kvm_sregs | None = None, rip: int | None = None,
                   vcpu: int = 0) -> bytes:
        """Up to ``length`` bytes at the guest's CS:RIP, through its page
        tables; stops at an unmapped page or the end of RAM."""
        s = sregs or self.get_sregs(vcpu)
        if rip is None:
            rip = self.get_regs(vcpu).rip
        long64 = bool(s.efer & EFER_LMA) and s.cs.l
        lin = rip if long64 else (s.cs.base + rip) & 0xFFFFFFFF
        out = bytearray()
        while len(out) < length:
            gpa = translate(self._read_u64, self._read_u32, s, lin + len(out))
            if gpa is None:
                break
            chunk = min(length - len(out), 0x1000 - (gpa & 0xFFF))
            if not self.gm.check(gpa, chunk):
                break
            out += self.gm.read(gpa, chunk)
        return bytes(out)

    def internal_error(self, vcpu: KvmVcpu, n: int, assists: dict) -> RunResult | None:
        """Assist the instruction KVM could not emulate on ``vcpu`` (its
        KVM_EXIT_INTERNAL_ERROR, which the compiled ``assist`` declined), or
        say why not.  ``n`` numbers the exit, so a repeat with nothing in
        between shows; an assist done is counted in ``assists`` by name."""
        r8, r32 = vcpu.r8, vcpu.r32
        sub = r32[RUN_INT_SUBERROR >> 2]
        exit_insn = None
        if sub == KVM_INTERNAL_ERROR_EMULATION and r32[RUN_INT_NDATA >> 2] >= 3 and \
                r8[RUN_INT_FLAGS] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            exit_insn = bytes(r8[RUN_INT_INSN:RUN_INT_INSN + min(r8[RUN_INT_INSN_SIZE], 15)])
        i = vcpu.index
        regs = self.get_regs(i)
        sregs = self.get_sregs(i)
        insn = self.fetch_insn(15, sregs, regs.rip, i)
        if not insn and exit_insn:
            insn = exit_insn
        if sub != KVM_INTERNAL_ERROR_EMULATION:
            return RunResult("internal-error", f"KVM internal error, suberror {sub}", self.regs_dict(i), insn)
        for prefix, (name, length, action) in ASSISTS.items():
            if insn.startswith(prefix):
                break
        else:
            return RunResult("internal-error", "emulation failure: KVM's instruction emulator cannot run the "
                             "instruction at RIP and it is not one we assist", self.regs_dict(i), insn)
        # A guest stuck on an assisted instruction comes back to it with every
        # register unchanged.  The same RIP alone is no sign: the kernel's
        # fpu__drop runs its fwait once per exiting task, and with a virtio
        # console nothing else may exit between two of them.
        # The state lives in the vCPU's assist array, shared with the compiled assist.
        st = vcpu.assist
        state = np.frombuffer(bytes(regs), dtype=np.int64)
        prev = st[AS_PREV_REGS:AS_PREV_REGS + len(state)]
        if np.array_equal(state, prev) and n == st[AS_EXIT] + 1:
            st[AS_REPEAT] += 1
            if st[AS_REPEAT] >= ASSIST_REPEAT_LIMIT:
                return RunResult("internal-error", f"{name} assisted {int(st[AS_REPEAT])} times at the same "
                                 "RIP with the same registers and no other exit between: the guest is not making "
                                 "progress", self.regs_dict(i), insn)
        else:
            prev[:] = state
            st[AS_REPEAT] = 1
        st[AS_EXIT] = n
        regs.rip = regs.rip + length
        self.set_regs(regs, i)
        if action == "bp":
            ev = self.get_events(i)
            if ev.exception.injected or ev.exception.pending:
                return RunResult("internal-error", f"{name}: an exception is already pending, cannot inject #BP",
                                 self.regs_dict(i), insn)
            ev.exception.injected = 1
            ev.exception.nr = 3
            ev.exception.has_error_code = 0
            ev.exception.error_code = 0
            ev.flags = 0
            self.set_events(ev, i)
        assists[name] = assists.get(name, 0) + 1
        return None

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the helper thread, unmap each kvm_run and close every fd we own
        (the bus's eventfds belong to the bus)."""
        if self._closed:
            return
        self._closed = True
        if self._pipe_w >= 0:
            try:
                os.write(self._pipe_w, b"x")
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)
        for v in self.vcpus:
            v.close()
        self.run_map = None
        for fd in reversed(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _segment(seg) -> kvm_segment:
    """kvm_segment from an object with kvm_segment's field names (the
    loader's Segment)."""
    out = kvm_segment()
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl"):
        setattr(out, name, getattr(seg, name))
    out.unusable = 0
    return out


def flat_segment(selector: int, *, code: bool, long_mode: bool = False, dpl: int = 0) -> kvm_segment:
    """A flat 4 GiB segment descriptor cache: code (execute/read, accessed)
    or data (read/write, accessed); ``long_mode`` sets L (and clears D/B)."""
    seg = kvm_segment()
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = dpl
    seg.s = 1
    seg.g = 1
    seg.l = 1 if (code and long_mode) else 0
    seg.db = 0 if (code and long_mode) else 1
    return seg


__all__ = ["KvmVmBase", "KvmVcpu", "RunResult", "ExitStats", "KvmError", "kvm_available", "translate", "flat_segment",
           "ASSISTS", "assist", "kick", "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_vcpu_events"]
