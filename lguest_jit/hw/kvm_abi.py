"""KVM's user-space ABI, as <linux/kvm.h> defines it for x86-64: ioctl
numbers, the ctypes structures they take, capability and exit numbers, the
kvm_run page's byte offsets, and the ioctl wrappers.  No state: the VM is
``hw.kvm``, the loop that runs a vCPU ``lguest_jit.vcpu``."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os

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
    # Header only; the entries follow it (see hw.kvm's set_gsi_routing).
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
    # Header only; the entries follow it (see hw.kvm's transfer_msrs).
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
KVM_MP_STATE_UNINITIALIZED = 1     # an AP waiting for INIT
KVM_MP_STATE_INIT_RECEIVED = 2     # an AP between INIT and SIPI
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


__all__ = sorted(n for n, v in list(globals().items())
                 if not n.startswith("_") and n not in ("annotations", "ctypes", "errno", "fcntl", "os"))
