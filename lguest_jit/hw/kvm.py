"""KVM backend: one VM, one vCPU, the in-kernel IRQ chip and PIT, driven from
Python through raw ioctls (fcntl + ctypes structures, no compiled extension).

What the launcher does here is what lguest's ``run_guest`` loop does, with
KVM doing the CPU part:

* guest RAM (a :class:`~lguest_jit.hw.memory.GuestMemory`) is one user
  memory slot at guest physical address 0;
* every port access and every access to an address with no memory slot
  (the PCI BARs above RAM) exits KVM_RUN and goes to the PCI bus object:
  with a bus that has ``run_vcpu`` (``pci.Bus``) the whole loop runs there
  as a nogil kernel (KVM_RUN through libc's ioctl, exits answered from
  flat tables, back to Python only for the rare cases, see HACKING.md);
  otherwise a Python loop calls ``bus.pio`` / ``bus.mmio``;
* queue notifications never reach this loop: each notify address is an
  ioeventfd, so KVM signals the queue thread's eventfd directly;
* devices raise interrupts through irqfds, again without the vCPU thread;
* a handful of instructions the PVM in-kernel emulator rejects (``int3``,
  ``fwait``) are assisted here, counted, and anything else is fatal.

The per-exit decode reads the shared ``kvm_run`` page through memoryviews
built once (``memoryview.cast``), so an exit costs a few indexings, not
object construction.
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
import time

import numpy as np

from .run import ExitStats, RunResult  # noqa: F401 - backend-neutral, re-exported for callers of kvm
from .x86 import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME,  # noqa: F401
                  EFER_SCE, MSR_EFER, MSR_FS_BASE, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
                  MSR_IA32_SYSENTER_ESP, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, RFLAGS_IF)

from numba import njit

from .firmware import with_apic_id, with_tsc_frequency
from .libc import sys_ioctl
from .memory import ld_u8, ld_u32

# ---------------------------------------------------------------------------
# ioctl numbers: <linux/ioctl.h> encodes direction, argument size, type and
# number; KVM's type is 0xAE (<linux/kvm.h>).

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
KVMIO = 0xAE


def ioc(direction: int, nr: int, size: int) -> int:
    """A KVM ioctl number: direction (IOC_*), number, argument size."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return ioc(IOC_NONE, nr, 0)


def _iow(nr, ctype):
    return ioc(IOC_WRITE, nr, ctypes.sizeof(ctype))


def _ior(nr, ctype):
    return ioc(IOC_READ, nr, ctypes.sizeof(ctype))


def _iowr(nr, ctype):
    return ioc(IOC_READ | IOC_WRITE, nr, ctypes.sizeof(ctype))


# ---------------------------------------------------------------------------
# Structures (x86 layouts from <linux/kvm.h> / <asm/kvm.h>)

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                   "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = ([(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    # Header only; the entries follow it in a larger buffer (see _cpuid_buffer).
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _routing_u)]


class kvm_irq_routing(ctypes.Structure):
    # Header only; the entries follow it (see KvmVm.set_gsi_routing).
    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_msi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
                ("pad", u8 * 12)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_translation(ctypes.Structure):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class _ev_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _ev_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("exception", _ev_exception), ("interrupt", _ev_interrupt), ("nmi", _ev_nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", _ev_smi),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    # Header only; the entries follow it (see KvmVm.transfer_msrs).
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


for _s, _n in ((kvm_regs, 144), (kvm_segment, 24), (kvm_sregs, 312), (kvm_userspace_memory_region, 32),
               (kvm_cpuid_entry2, 40), (kvm_ioeventfd, 64), (kvm_irqfd, 32), (kvm_pit_config, 64),
               (kvm_vcpu_events, 64), (kvm_translation, 24), (kvm_msr_entry, 16),
               (kvm_msrs, 8), (kvm_irq_routing_entry, 48), (kvm_irq_routing, 8), (kvm_msi, 32)):
    assert ctypes.sizeof(_s) == _n, (_s.__name__, ctypes.sizeof(_s))

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, kvm_irq_routing)
KVM_SIGNAL_MSI = _iow(0xA5, kvm_msi)
KVM_IRQFD = _iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_TRANSLATE = _iowr(0x85, kvm_translation)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SIGNAL_MSI = 77

# GSI routing (KVM_SET_GSI_ROUTING).  Setting routes replaces KVM's
# defaults, so the table always starts with them: GSI 0-15 on the master
# and slave PIC and the I/O APIC, 16-23 on the I/O APIC only (the PIT and
# the UART depend on these).  MSI routes follow from MSI_GSI_BASE.
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
IOAPIC_PINS = 24
MSI_GSI_BASE = IOAPIC_PINS
# x86 MSI: a write to the local APICs' window, address_hi 0 (no x2APIC
# extended ids here).  Anything else would be a DMA write on real hardware;
# it gets no route, so the message goes nowhere.
MSI_ADDR_BASE, MSI_ADDR_MASK = 0xFEE00000, 0xFFF00000


def default_irq_routes() -> list[tuple[int, int, int]]:
    """KVM's own default routing as (gsi, irqchip, pin)."""
    out = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16:
            out.append((gsi, KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE, gsi % 8))
        out.append((gsi, KVM_IRQCHIP_IOAPIC, gsi))
    return out


def msi_deliverable(address: int | None) -> bool:
    return address is not None and address >> 32 == 0 and address & MSI_ADDR_MASK == MSI_ADDR_BASE

KVM_PIT_SPEAKER_DUMMY = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3

# Exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
              7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
              24: "SYSTEM_EVENT"}

# kvm_run byte offsets (struct kvm_run, x86).
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IF_FLAG = 13
RUN_UNION = 32
# io: direction u8, size u8, port u16, count u32, data_offset u64
RUN_IO_DIRECTION, RUN_IO_SIZE, RUN_IO_PORT, RUN_IO_COUNT, RUN_IO_DATA_OFFSET = 32, 33, 34, 36, 40
# mmio: phys_addr u64, data[8], len u32, is_write u8
RUN_MMIO_PHYS, RUN_MMIO_DATA, RUN_MMIO_LEN, RUN_MMIO_IS_WRITE = 32, 40, 48, 52
# internal / emulation_failure: suberror u32, ndata u32, flags u64, insn_size u8, insn_bytes[15]
RUN_INT_SUBERROR, RUN_INT_NDATA, RUN_INT_FLAGS, RUN_INT_INSN_SIZE, RUN_INT_INSN = 32, 36, 40, 48, 49
# system_event: type u32, ndata u32, data[]
RUN_SYSEV_TYPE = 32
# fail_entry: hardware_entry_failure_reason u64
RUN_FAIL_REASON = 32

# The compiled vCPU loop (a bus's ``run_vcpu``, see KvmVm._loop) shares an
# int64 control array with KvmVm, indexed by V_*, and returns a VCPU_* code.
V_STOP = 0          # stop() sets it; the loop returns VCPU_STOPPED before its next KVM_RUN
V_LIMIT = 1         # V_EXITS value at which the loop returns VCPU_LIMIT (-1: no limit)
V_EXITS = 2         # exits, all kinds (cumulative over the VM's life)
V_PIO = 3           # port-I/O exits
V_MMIO = 4          # MMIO exits
V_INTR = 5          # KVM_EXIT_INTR exits
V_ERRNO = 6         # errno of a failed KVM_RUN (VCPU_ERRNO)
V_FD = 7            # the vCPU fd (for the assists' register ioctls)
V_ASSIST_FWAIT = 8  # assists done in compiled code, per instruction
V_ASSIST_INT3 = 9
V_ASSIST_EXIT = 10  # repeat detection (both loops): exit number of the last assist,
V_ASSIST_REPEAT = 11    # how often in a row with the same registers,
V_PREV_REGS = 16        # and those registers (struct kvm_regs, 18 words)
V_REGS = 34         # scratch: struct kvm_regs for KVM_GET/SET_REGS
V_EVENTS = 52       # scratch: struct kvm_vcpu_events (64 bytes)
V_FIELDS = 64
VCPU_LIMIT = 1      # ctl[V_LIMIT] exits handled
VCPU_STOPPED = 2    # ctl[V_STOP] was set
VCPU_EINTR = 3      # KVM_RUN returned EINTR: a signal (stop, timeout, halt poll, profiler)
VCPU_ERRNO = 4      # KVM_RUN failed otherwise
VCPU_EXIT = 5       # an exit only Python handles (halt, shutdown, system event, fatal, unknown)

# Where KVM's real-mode helpers live: just below 4 GiB, above any PCI window
# we hand out and out of RAM (as QEMU and the notes place them).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

_libc = ctypes.CDLL(None, use_errno=True)


class KvmError(OSError):
    """A KVM ioctl failed; the message names the ioctl."""


_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg=0, name: str = ""):
    """fcntl.ioctl for structures; integer arguments go through libc because
    fcntl.ioctl squeezes them into a C int (KVM_SET_TSS_ADDR's 0xfffbd000
    does not fit)."""
    if isinstance(arg, int):
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                raise InterruptedError(err, os.strerror(err))
            raise KvmError(err, f"{name or hex(request)} failed: {os.strerror(err)}")
        return ret
    try:
        return fcntl.ioctl(fd, request, arg)
    except InterruptedError:
        raise
    except OSError as e:
        raise KvmError(e.errno, f"{name or hex(request)} failed: {os.strerror(e.errno)}") from None


def ioctl_growing(fd: int, request: int, make_buffer, name: str, limit: int, start: int = 64):
    """A KVM_GET_* ioctl whose argument is a list with its length: the
    buffer ``make_buffer(n)`` for n entries, doubled while KVM says E2BIG
    (up to ``limit`` entries).  Returns the filled buffer."""
    n = start
    while True:
        buf = make_buffer(n)
        try:
            fcntl.ioctl(fd, request, buf)
            return buf
        except OSError as e:
            if e.errno != errno.E2BIG or n >= limit:
                raise KvmError(e.errno, f"{name} failed: {os.strerror(e.errno)}") from None
            n *= 2


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




@njit(nogil=True, cache=True)
def assist(run, ctl):
    """The emulation assist for the KVM_EXIT_INTERNAL_ERROR in ``run``, in
    compiled code when KVM passed the instruction bytes and they are one
    of ASSISTS: RIP += 1, and for int3 #BP injected.  Returns 0 when done,
    VCPU_EXIT when Python must decide (anything else, an exception already
    pending, the repeat limit reached, a failed ioctl) -- having changed
    nothing, so ``KvmVm._internal_error`` sees the same state."""
    if (ld_u32(run, RUN_INT_SUBERROR) != KVM_INTERNAL_ERROR_EMULATION or ld_u32(run, RUN_INT_NDATA) < 3
            or (ld_u8(run, RUN_INT_FLAGS) & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
            or ld_u8(run, RUN_INT_INSN_SIZE) < 1):
        return VCPU_EXIT
    op = ld_u8(run, RUN_INT_INSN)
    if op != 0x9B and op != 0xCC:
        return VCPU_EXIT
    fd = ctl[V_FD]
    base = ctl.ctypes.data
    if sys_ioctl(fd, KVM_GET_REGS, base + 8 * V_REGS) < 0:
        return VCPU_EXIT
    n = ctl[V_EXITS]
    same = n == ctl[V_ASSIST_EXIT] + 1
    for i in range(18):
        if ctl[V_REGS + i] != ctl[V_PREV_REGS + i]:
            same = False
    if same and ctl[V_ASSIST_REPEAT] + 1 >= ASSIST_REPEAT_LIMIT:
        return VCPU_EXIT
    if op == 0xCC:
        if sys_ioctl(fd, KVM_GET_VCPU_EVENTS, base + 8 * V_EVENTS) < 0:
            return VCPU_EXIT
        ex = ctl[V_EVENTS]
        if (ex & 0xFF) != 0 or ((ex >> 24) & 0xFF) != 0:      # exception injected or pending
            return VCPU_EXIT
    if same:
        ctl[V_ASSIST_REPEAT] += 1
    else:
        for i in range(18):
            ctl[V_PREV_REGS + i] = ctl[V_REGS + i]
        ctl[V_ASSIST_REPEAT] = 1
    ctl[V_ASSIST_EXIT] = n
    ctl[V_REGS + 16] += 1                                      # rip: both are one byte long
    if sys_ioctl(fd, KVM_SET_REGS, base + 8 * V_REGS) < 0:
        return VCPU_EXIT
    if op == 0xCC:
        # exception {injected 1, nr 3, no error code}; flags (bytes 20-23) 0
        ctl[V_EVENTS] = 1 | (3 << 8)
        ctl[V_EVENTS + 2] &= 0xFFFFFFFF
        if sys_ioctl(fd, KVM_SET_VCPU_EVENTS, base + 8 * V_EVENTS) < 0:
            return VCPU_EXIT
        ctl[V_ASSIST_INT3] += 1
    else:
        ctl[V_ASSIST_FWAIT] += 1
    return 0


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
    # vCPU exits for another reason; KvmVm.stop documents this.


# ---------------------------------------------------------------------------
# The VM


class KvmVm:
    """One KVM virtual machine with one vCPU over ``gm``, exits handed to ``bus``.

    ``bus`` provides ``pio(port, size, is_write, value)``, ``mmio(addr,
    size, is_write, value)`` and optionally ``ioeventfds()``,
    ``interrupts()``, ``irq_pending(line)`` (see ``attach_bus``).
    ``cpuid_hook(entries)`` may edit the list of ``kvm_cpuid_entry2``
    before KVM_SET_CPUID2.  ``irq_mode`` forces how device interrupts reach
    the irqchip: "resample" (level: KVM_IRQFD + resamplefd), "irqfd"
    (edge pulse per eventfd write), "line" (a Python thread reads each
    eventfd and calls KVM_IRQ_LINE), or None to choose (see ``attach_bus``).
    """

    def __init__(self, gm, bus=None, *, cpuid_hook=None, irq_mode: str | None = None,
                 device: str = "/dev/kvm"):
        self.gm = gm
        self.bus = None
        self.stats = ExitStats()
        self.irq_mode = None
        self._fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self.ctl = np.zeros(V_FIELDS, dtype=np.int64)    # shared with the compiled loop (V_* fields)
        self.first_run_at = None       # time.time() of the first KVM_RUN: start-up time in --stats
        self.ctl[V_LIMIT] = -1
        self.ctl[V_ASSIST_EXIT] = -2
        self._halt_check = False
        self._timed_out = False
        self._reset_requested = False
        self._closed = False
        self._vcpu_thread = None
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
            self.vcpu_fd = self._own(ioctl(self.vm_fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU"))
            self.ctl[V_FD] = self.vcpu_fd
            self._set_cpuid(cpuid_hook)
            size = ioctl(self.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            self.run_map = mmap.mmap(self.vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Views built once: the hot loop only indexes them.
            self._r8 = memoryview(self.run_map)
            self._r16 = self._r8.cast("H")
            self._r32 = self._r8.cast("I")
            self._r64 = self._r8.cast("Q")
            self._run = np.frombuffer(self.run_map, dtype=np.uint8)   # for the compiled loop
            self._immediate_exit_ok = bool(self.check_extension(KVM_CAP_IMMEDIATE_EXIT))
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

    def _set_cpuid(self, hook) -> None:
        # With the TSC frequency in CPUID the guest skips calibrating it
        # against the PIT; the APIC id is vCPU 0's, not the host CPU's
        # KVM_GET_SUPPORTED_CPUID reports (hw/firmware.py).
        entries = with_apic_id(with_tsc_frequency(self.supported_cpuid(), self.tsc_khz()), 0)
        if hook is not None:
            entries = list(hook(entries))
        buf = self._cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.vcpu_fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    # -- registers ------------------------------------------------------------

    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        ioctl(self.vcpu_fd, KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: kvm_regs) -> None:
        ioctl(self.vcpu_fd, KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        ioctl(self.vcpu_fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: kvm_sregs) -> None:
        ioctl(self.vcpu_fd, KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def get_events(self) -> kvm_vcpu_events:
        ev = kvm_vcpu_events()
        ioctl(self.vcpu_fd, KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_events(self, ev: kvm_vcpu_events) -> None:
        ioctl(self.vcpu_fd, KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def transfer_msrs(self, request: int, items) -> list:
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
        n = ioctl(self.vcpu_fd, request, buf, name)
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

    def make_runnable(self) -> None:
        """Leave a HLT state (KVM_SET_MP_STATE RUNNABLE): needed before
        running new code on a vCPU that halted."""
        ioctl(self.vcpu_fd, KVM_SET_MP_STATE, kvm_mp_state(KVM_MP_STATE_RUNNABLE), "KVM_SET_MP_STATE")

    def regs_dict(self) -> dict:
        r = self.get_regs()
        d = {n: getattr(r, n) for n, _ in kvm_regs._fields_}
        try:
            s = self.get_sregs()
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

    def claim_reset_port(self) -> None:
        """Claim port 0x64 on the bus so the guest can reboot the PC way:
        0xFE written there pulses the reset line (Linux's ``reboot=k``, its
        default first try) and ``run`` returns "reboot".  Reads answer
        0xFF, exactly as the unclaimed port did ("no keyboard controller"),
        so i8042 probing is unchanged."""
        add = getattr(self.bus, "add_kernel_ports", None)
        if add is not None:
            add(0x64, 1, self._reset_port, "reset")     # reads and other writes answered in compiled code
        else:
            self.bus.add_ports(0x64, 1, self._reset_port)

    def _reset_port(self, port: int, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return (1 << (8 * size)) - 1
        if value & 0xFF == 0xFE:
            self._reset_requested = True
            self._stop = True
            self.ctl[V_STOP] = 1
        return 0

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

    # -- the vCPU loop -----------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run`` return "stopped" soon, from any thread: sets
        immediate_exit and kicks the vCPU thread out of KVM_RUN with a signal
        (the handler is installed when the first KvmVm is built on the main
        thread)."""
        self._stop = True
        self.ctl[V_STOP] = 1
        if self.run_map is not None and self._immediate_exit_ok:
            self._r8[RUN_IMMEDIATE_EXIT] = 1
        self._kick()

    def run(self, timeout: float | None = None, max_exits: int | None = None,
            halt_poll: float | None = 1.0) -> RunResult:
        """Run the vCPU until the guest powers off, reboots, halts for good,
        faults fatally, ``stop()`` is called, ``timeout`` seconds pass or
        ``max_exits`` exits were handled.

        ``halt_poll``: every so many seconds the vCPU is kicked out of
        KVM_RUN to see whether it sits in HLT with interrupts off (how Linux
        ends ``poweroff`` without ACPI); that ends the run as "halt".  One
        extra exit per interval; None disables it."""
        if self.bus is None:
            raise RuntimeError("attach a bus before running the guest")
        self._stop = False
        self.ctl[V_STOP] = 0
        self._halt_check = False
        self._timed_out = False
        self._r8[RUN_IMMEDIATE_EXIT] = 0
        self._vcpu_thread = threading.get_ident()
        fast = getattr(self.bus, "run_vcpu", None)
        if fast is not None:
            # Returns at once (stop set): compiles or loads the loop before
            # any timeout starts counting.
            warm = self.ctl.copy()
            warm[V_STOP] = 1
            fast(self.vcpu_fd, self._run, warm)
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
        try:
            return self._loop(max_exits)
        finally:
            done.set()
            if poller is not None:
                poller.join()
            if timer is not None:
                timer.cancel()
            self._vcpu_thread = None
            self._r8[RUN_IMMEDIATE_EXIT] = 0

    def _timeout_kick(self):
        self._timed_out = True
        self.stop()

    def _signalled(self) -> RunResult | None:
        # KVM_RUN returned EINTR: count it, let _on_signal look, then answer
        # the halt poll's question if it asked.
        self.stats.intr += 1
        self._on_signal()
        if self._halt_check:
            self._halt_check = False
            if self.halted_for_good():
                return RunResult("halt", "the guest halted with interrupts disabled", self._safe_regs())
        return None

    def _loop(self, max_exits) -> RunResult:
        fast = getattr(self.bus, "run_vcpu", None)
        if fast is None:
            return self._loop_python(max_exits)
        ctl = self.ctl
        stats = self.stats
        start = ctl[V_EXITS]
        ctl[V_LIMIT] = start + max_exits if max_exits is not None else -1
        counted = [V_PIO, V_MMIO, V_INTR, V_EXITS, V_ASSIST_FWAIT, V_ASSIST_INT3]
        seen = ctl[counted].copy()
        try:
            while True:
                if self._stop:
                    return self._stopped()
                code = fast(self.vcpu_fd, self._run, ctl)
                if code == VCPU_EINTR:
                    res = self._signalled()
                    if res is not None:
                        return res
                    continue
                if code == VCPU_STOPPED:
                    if not self._stop:       # a compiled handler asked (none does today): stop as asked
                        return RunResult("stopped", "the vCPU loop stopped")
                    continue
                n = int(ctl[V_EXITS] - start)
                if code == VCPU_LIMIT:
                    return RunResult("stopped", f"{n} exits handled (max_exits)")
                if code == VCPU_ERRNO:
                    return RunResult("internal-error", f"KVM_RUN failed: {os.strerror(int(ctl[V_ERRNO]))}",
                                     self._safe_regs())
                reason = self._r32[2]
                if reason == KVM_EXIT_MMIO:
                    ln, addr = self._r32[RUN_MMIO_LEN >> 2], self._r64[RUN_MMIO_PHYS >> 3]
                    return RunResult("internal-error", f"MMIO access of {ln} bytes at {addr:#x}", self._safe_regs())
                if reason == KVM_EXIT_IO:
                    return RunResult("internal-error", f"port I/O exit of size {self._r8[RUN_IO_SIZE]} "
                                     "that KVM should not send", self._safe_regs())
                if reason == KVM_EXIT_INTERNAL_ERROR:
                    res = self._internal_error(int(ctl[V_EXITS]))
                else:
                    res = self._other_exit(reason)
                if res is not None:
                    return res
                if ctl[V_EXITS] == ctl[V_LIMIT]:
                    return RunResult("stopped", f"{n} exits handled (max_exits)")
        finally:
            d = ctl[counted] - seen
            stats.pio += int(d[0])
            stats.mmio += int(d[1])
            stats.intr += int(d[2])
            stats.total += int(d[3])
            for name, k in (("fwait", d[4]), ("int3", d[5])):
                if k:
                    stats.assists[name] = stats.assists.get(name, 0) + int(k)
            ctl[V_LIMIT] = -1

    def _loop_python(self, max_exits) -> RunResult:
        # The loop for a bus without compiled dispatch (a test's fake bus).
        # Locals for the hot path: attribute lookups cost more than the work.
        # Exit data is read through the memoryview of its width: the
        # string-I/O buffer (data_offset) is page-aligned and the MMIO data
        # field 8-aligned, so ``view[offset // size]`` is the value.
        fd = self.vcpu_fd
        r8, r16, r32, r64 = self._r8, self._r16, self._r32, self._r64
        by_size = (None, r8, r16, None, r32, None, None, None, r64)
        pio = self.bus.pio
        mmio = self.bus.mmio
        stats = self.stats
        ioctl = fcntl.ioctl
        n = n_pio = n_mmio = 0
        limit = max_exits if max_exits is not None else -1
        try:
            while True:
                if self._stop:
                    return self._stopped()
                try:
                    ioctl(fd, KVM_RUN, 0)
                except InterruptedError:
                    res = self._signalled()
                    if res is not None:
                        return res
                    continue
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    return RunResult("internal-error", f"KVM_RUN failed: {os.strerror(e.errno)}", self._safe_regs())
                reason = r32[2]                                  # exit_reason at byte 8
                n += 1
                if reason == KVM_EXIT_IO:
                    size = r8[RUN_IO_SIZE]
                    port = r16[RUN_IO_PORT >> 1]
                    count = r32[RUN_IO_COUNT >> 2]
                    view = by_size[size]
                    idx = r64[RUN_IO_DATA_OFFSET >> 3] // size
                    if r8[RUN_IO_DIRECTION] == KVM_EXIT_IO_OUT:
                        for i in range(idx, idx + count):
                            pio(port, size, True, view[i])
                    else:
                        mask = (1 << (8 * size)) - 1
                        for i in range(idx, idx + count):
                            view[i] = pio(port, size, False, 0) & mask
                    n_pio += 1
                elif reason == KVM_EXIT_MMIO:
                    ln = r32[RUN_MMIO_LEN >> 2]
                    addr = r64[RUN_MMIO_PHYS >> 3]
                    if ln not in (1, 2, 4, 8):
                        return RunResult("internal-error", f"MMIO access of {ln} bytes at {addr:#x}", self._safe_regs())
                    view = by_size[ln]
                    if r8[RUN_MMIO_IS_WRITE]:
                        mmio(addr, ln, True, view[RUN_MMIO_DATA // ln])
                    else:
                        view[RUN_MMIO_DATA // ln] = mmio(addr, ln, False, 0) & ((1 << (8 * ln)) - 1)
                    n_mmio += 1
                elif reason == KVM_EXIT_INTR:
                    stats.intr += 1
                elif reason == KVM_EXIT_INTERNAL_ERROR:
                    res = self._internal_error(n)
                    if res is not None:
                        return res
                else:
                    res = self._other_exit(reason)
                    if res is not None:
                        return res
                if n == limit:
                    return RunResult("stopped", f"{n} exits handled (max_exits)")
        finally:
            stats.pio += n_pio
            stats.mmio += n_mmio
            stats.total += n

    profiler = None     # a hw.profile.Profiler attached to this VM, or None

    def _on_signal(self) -> None:
        """A signal took the vCPU thread out of KVM_RUN (a kick: stop, the
        halt poll, or the profiler's timer): the vCPU's registers are
        readable now, so this is where a profile sample is taken.  Runs on
        the vCPU thread; the caller re-enters the guest."""
        if self.profiler is not None:
            self.profiler.sample()

    def halted_for_good(self) -> bool:
        """True when the vCPU sits in HLT with IF clear.  With the in-kernel
        irqchip such a HLT never exits KVM_RUN (KVM blocks the vCPU in the
        kernel waiting for an interrupt that cannot be taken), so the loop
        asks after a kick instead.  Only call it from the vCPU thread."""
        st = kvm_mp_state()
        ioctl(self.vcpu_fd, KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state == KVM_MP_STATE_HALTED and not self.get_regs().rflags & RFLAGS_IF

    def _halt_poll(self, interval: float, done: threading.Event) -> None:
        while not done.wait(interval):
            self._halt_check = True
            self._kick()

    def _kick(self) -> None:
        t = self._vcpu_thread
        if t is not None and _kick_installed:
            try:
                signal.pthread_kill(t, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _stopped(self) -> RunResult:
        if self._reset_requested:
            self._reset_requested = False
            return RunResult("reboot", "reset through the keyboard controller (0xFE to port 0x64)")
        if self._timed_out:
            self._timed_out = False
            if self.halted_for_good():
                return RunResult("halt", "the guest halted with interrupts disabled", self._safe_regs())
            return RunResult("timeout", "the run timed out", self._safe_regs())
        return RunResult("stopped", "stop() was called")

    def _safe_regs(self) -> dict | None:
        try:
            return self.regs_dict()
        except OSError:
            return None

    def _other_exit(self, reason: int) -> RunResult | None:
        if reason == KVM_EXIT_HLT:
            return RunResult("halt", "the guest halted", self._safe_regs())
        if reason == KVM_EXIT_SHUTDOWN:
            return RunResult("shutdown", "triple fault (KVM_EXIT_SHUTDOWN): the guest reset itself by faulting",
                             self._safe_regs(), self.fetch_insn())
        if reason == KVM_EXIT_SYSTEM_EVENT:
            t = self._r32[RUN_SYSEV_TYPE >> 2]
            if t == KVM_SYSTEM_EVENT_SHUTDOWN:
                return RunResult("poweroff", "the guest powered off")
            if t == KVM_SYSTEM_EVENT_RESET:
                return RunResult("reboot", "the guest asked for a reset")
            return RunResult("internal-error", f"system event {t} (crash)", self._safe_regs())
        if reason == KVM_EXIT_FAIL_ENTRY:
            return RunResult("fail-entry", f"VM entry failed, hardware reason {self._r64[RUN_FAIL_REASON >> 3]:#x}",
                             self._safe_regs())
        if reason == KVM_EXIT_IRQ_WINDOW_OPEN:
            return None
        return RunResult("unknown-exit", f"unhandled exit {EXIT_NAMES.get(reason, reason)}", self._safe_regs())

    # -- emulation assists ------------------------------------------------------------

    def _read_u64(self, gpa):
        return int.from_bytes(self.gm.read(gpa, 8), "little") if self.gm.check(gpa, 8) else None

    def _read_u32(self, gpa):
        return int.from_bytes(self.gm.read(gpa, 4), "little") if self.gm.check(gpa, 4) else None

    def fetch_insn(self, length: int = 15, sregs: kvm_sregs | None = None, rip: int | None = None) -> bytes:
        """Up to ``length`` bytes at the guest's CS:RIP, through its page
        tables; stops at an unmapped page or the end of RAM."""
        s = sregs or self.get_sregs()
        if rip is None:
            rip = self.get_regs().rip
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

    def _internal_error(self, n: int) -> RunResult | None:
        """Assist the instruction KVM could not emulate, or say why not.
        ``n`` numbers the exit, so a repeat with nothing in between shows."""
        r8, r32 = self._r8, self._r32
        sub = r32[RUN_INT_SUBERROR >> 2]
        exit_insn = None
        if sub == KVM_INTERNAL_ERROR_EMULATION and r32[RUN_INT_NDATA >> 2] >= 3 and \
                r8[RUN_INT_FLAGS] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            exit_insn = bytes(r8[RUN_INT_INSN:RUN_INT_INSN + min(r8[RUN_INT_INSN_SIZE], 15)])
        regs = self.get_regs()
        sregs = self.get_sregs()
        insn = self.fetch_insn(15, sregs, regs.rip)
        if not insn and exit_insn:
            insn = exit_insn
        if sub != KVM_INTERNAL_ERROR_EMULATION:
            return RunResult("internal-error", f"KVM internal error, suberror {sub}", self.regs_dict(), insn)
        for prefix, (name, length, action) in ASSISTS.items():
            if insn.startswith(prefix):
                break
        else:
            return RunResult("internal-error", "emulation failure: KVM's instruction emulator cannot run the "
                             "instruction at RIP and it is not one we assist", self.regs_dict(), insn)
        # A guest stuck on an assisted instruction comes back to it with every
        # register unchanged.  The same RIP alone is no sign: the kernel's
        # fpu__drop runs its fwait once per exiting task, and with a virtio
        # console nothing else may exit between two of them.
        # The state lives in ctl, shared with the compiled assist.
        ctl = self.ctl
        state = np.frombuffer(bytes(regs), dtype=np.int64)
        prev = ctl[V_PREV_REGS:V_PREV_REGS + len(state)]
        if np.array_equal(state, prev) and n == ctl[V_ASSIST_EXIT] + 1:
            ctl[V_ASSIST_REPEAT] += 1
            if ctl[V_ASSIST_REPEAT] >= ASSIST_REPEAT_LIMIT:
                return RunResult("internal-error", f"{name} assisted {int(ctl[V_ASSIST_REPEAT])} times at the same "
                                 "RIP with the same registers and no other exit between: the guest is not making "
                                 "progress", self.regs_dict(), insn)
        else:
            prev[:] = state
            ctl[V_ASSIST_REPEAT] = 1
        ctl[V_ASSIST_EXIT] = n
        regs.rip = regs.rip + length
        self.set_regs(regs)
        if action == "bp":
            ev = self.get_events()
            if ev.exception.injected or ev.exception.pending:
                return RunResult("internal-error", f"{name}: an exception is already pending, cannot inject #BP",
                                 self.regs_dict(), insn)
            ev.exception.injected = 1
            ev.exception.nr = 3
            ev.exception.has_error_code = 0
            ev.exception.error_code = 0
            ev.flags = 0
            self.set_events(ev)
        self.stats.assists[name] = self.stats.assists.get(name, 0) + 1
        return None

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the helper thread, unmap kvm_run and close every fd we own
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
        self._run = None
        for name in ("_r64", "_r32", "_r16", "_r8"):
            mv = getattr(self, name, None)
            if mv is not None:
                mv.release()
                setattr(self, name, None)
        if self.run_map is not None:
            self.run_map.close()
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


__all__ = ["KvmVm", "RunResult", "ExitStats", "KvmError", "kvm_available", "translate", "flat_segment",
           "ASSISTS", "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_vcpu_events"]
