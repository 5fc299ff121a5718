"""Every piece of KVM state a snapshot needs, read and written as raw blobs.

A snapshot must bring back a vCPU bit for bit, so the state is kept in the
kernel's own binary layouts (``<linux/kvm.h>``, x86): each class is one
get/set ioctl pair with a fixed-size buffer, saved as bytes and handed back
unchanged.  Nothing here interprets the blobs except the few fields a
restore has to reason about (MSR lists, the TSC).

``CLASSES`` is the table: name, which fd (vCPU or VM), the two ioctl
numbers, the buffer size and the KVM capability it needs (0: always there).
``probe(vm)`` reports, per class, whether this host can get it and set the
same value back: the facts behind HACKING.md's snapshot notes.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from .fields import Blob, Int, List, Map, Record, blob, check
from .firmware import MAX_CPUS
from .kvm import IOC_READ, IOC_WRITE, KVM_GET_MSRS, KVM_SET_MSRS, KvmError, ioc, ioctl, ioctl_growing, u32

VCPU, VM = "vcpu", "vm"


def _rd(nr: int, size: int) -> int:
    return ioc(IOC_READ, nr, size)


def _wr(nr: int, size: int) -> int:
    return ioc(IOC_WRITE, nr, size)


@dataclass(frozen=True)
class StateClass:
    name: str
    fd: str            # VCPU or VM
    get: int           # ioctl request numbers
    set: int
    size: int          # bytes of the kernel structure
    cap: int = 0       # KVM_CAP_* that must be present (0: part of the base API)
    chip: int = -1     # KVM_GET_IRQCHIP: which chip (the first u32 of the buffer)


# Sizes of the x86 structures (asserted against the kernel headers' layouts
# in tests/test_vmstate.py by the fields a test reads back).
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQCHIP = 0        # checked by KvmVmBase itself

_IRQCHIP = 8 + 512         # struct kvm_irqchip: chip_id, pad, union of 512 bytes

CLASSES = (
    StateClass("regs", VCPU, _rd(0x81, 144), _wr(0x82, 144), 144),
    StateClass("sregs", VCPU, _rd(0x83, 312), _wr(0x84, 312), 312),
    StateClass("fpu", VCPU, _rd(0x8C, 416), _wr(0x8D, 416), 416),
    StateClass("xsave", VCPU, _rd(0xA4, 4096), _wr(0xA5, 4096), 4096, KVM_CAP_XSAVE),
    StateClass("xcrs", VCPU, _rd(0xA6, 392), _wr(0xA7, 392), 392, KVM_CAP_XCRS),
    StateClass("lapic", VCPU, _rd(0x8E, 1024), _wr(0x8F, 1024), 1024),
    StateClass("events", VCPU, _rd(0x9F, 64), _wr(0xA0, 64), 64, KVM_CAP_VCPU_EVENTS),
    StateClass("mp_state", VCPU, _rd(0x98, 4), _wr(0x99, 4), 4, KVM_CAP_MP_STATE),
    StateClass("debugregs", VCPU, _rd(0xA1, 128), _wr(0xA2, 128), 128, KVM_CAP_DEBUGREGS),
    StateClass("pic_master", VM, ioc(IOC_READ | IOC_WRITE, 0x62, _IRQCHIP), _rd(0x63, _IRQCHIP), _IRQCHIP,
               chip=0),
    StateClass("pic_slave", VM, ioc(IOC_READ | IOC_WRITE, 0x62, _IRQCHIP), _rd(0x63, _IRQCHIP), _IRQCHIP,
               chip=1),
    StateClass("ioapic", VM, ioc(IOC_READ | IOC_WRITE, 0x62, _IRQCHIP), _rd(0x63, _IRQCHIP), _IRQCHIP,
               chip=2),
    StateClass("pit2", VM, _rd(0x9F, 112), _wr(0xA0, 112), 112),
    StateClass("clock", VM, _rd(0x7C, 48), _wr(0x7B, 48), 48, KVM_CAP_ADJUST_CLOCK),
)
BY_NAME = {c.name: c for c in CLASSES}

KVM_GET_MSR_INDEX_LIST = ioc(IOC_READ | IOC_WRITE, 0x02, 4)
MSR_IA32_TSC = 0x10
# KVM_SET_CLOCK flags in kvm_clock_data: which extra fields are valid.
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


def _fd(vm, cls: StateClass, vcpu: int = 0) -> int:
    if cls.fd != VCPU:
        return vm.vm_fd
    return vm.vcpus[vcpu].fd if vcpu else vm.vcpu_fd


def _buffer(cls: StateClass, data: bytes | None = None):
    buf = (ctypes.c_uint8 * cls.size)()
    if data is not None:
        if len(data) != cls.size:
            raise ValueError(f"{cls.name}: {len(data)} bytes, the kernel structure has {cls.size}")
        ctypes.memmove(buf, data, cls.size)
    elif cls.chip >= 0:
        ctypes.cast(buf, ctypes.POINTER(u32))[0] = cls.chip
    return buf


def get(vm, name: str, vcpu: int = 0) -> bytes:
    """The raw state ``name`` (a ``CLASSES`` entry) of ``vm`` (a vCPU
    class: of vCPU ``vcpu``)."""
    cls = BY_NAME[name]
    buf = _buffer(cls)
    ioctl(_fd(vm, cls, vcpu), cls.get, buf, f"get {name}")
    return bytes(buf)


def put(vm, name: str, data: bytes, vcpu: int = 0) -> None:
    """Write back raw state ``name`` as :func:`get` returned it."""
    cls = BY_NAME[name]
    ioctl(_fd(vm, cls, vcpu), cls.set, _buffer(cls, data), f"set {name}")


def available(vm, cls: StateClass) -> bool:
    return cls.cap == 0 or bool(vm.check_extension(cls.cap))


# -- MSRs -------------------------------------------------------------------------


def msr_index_list(vm) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
    def index_list(n):
        class _list(ctypes.Structure):
            _fields_ = [("nmsrs", u32), ("indices", u32 * n)]
        return _list(nmsrs=n)

    buf = ioctl_growing(vm.kvm_fd, KVM_GET_MSR_INDEX_LIST, index_list, "KVM_GET_MSR_INDEX_LIST", limit=16384)
    return [buf.indices[i] for i in range(buf.nmsrs)]


def get_msrs(vm, indices, vcpu: int = 0) -> dict[int, int]:
    """Every MSR of ``indices`` KVM will read, one ioctl per refusal: KVM
    stops at the first MSR it cannot read, so the rest are retried past it.
    The ones it refuses are left out (listed in ``msr_index_list`` but
    unreadable on this host: probe() reports them)."""
    out = {}
    todo = [int(i) for i in indices]
    while todo:
        done = vm.transfer_msrs(KVM_GET_MSRS, [(i, 0) for i in todo], vcpu)
        out.update(done)
        todo = todo[len(done) + 1:]     # skip the refused one
    return out


def set_msrs(vm, values: dict[int, int], vcpu: int = 0) -> list[int]:
    """Write ``values``; returns the MSRs KVM refused (each retried past, as
    in get_msrs), so a caller decides whether a refusal matters."""
    refused = []
    todo = list(values.items())
    while todo:
        done = vm.transfer_msrs(KVM_SET_MSRS, todo, vcpu)
        if len(done) < len(todo):
            refused.append(todo[len(done)][0])
        todo = todo[len(done) + 1:]
    return refused


# -- the whole machine --------------------------------------------------------------


# What a snapshot holds: each class as its kernel structure (base64, exact
# size; a class this host lacks is absent) and the MSRs by number.
_MSRS = Map(Int(0, 2**32 - 1), Int(0, 2**64 - 1), 4096)
# vCPUs 1.. carry only the per-vCPU classes (the VM-wide ones are vCPU 0's record's).
_VCPU_CLASSES = [c for c in CLASSES if c.fd == VCPU]
STATE = Record({"classes": Record({c.name: Blob(c.size) for c in CLASSES}, optional=[c.name for c in CLASSES]),
                "msrs": _MSRS,
                "vcpus": List(Record({"classes": Record({c.name: Blob(c.size) for c in _VCPU_CLASSES},
                                                        optional=[c.name for c in _VCPU_CLASSES]),
                                      "msrs": _MSRS}), MAX_CPUS - 1)},
               optional=["vcpus"])


def save(vm) -> dict:
    """Every available state class of ``vm`` plus its MSRs, as ``STATE``'s
    fields, for the VM and vCPU 0; with more than one vCPU ``"vcpus"``: the
    same two for each of vCPUs 1.. in order.  Every vCPU must be stopped
    (out of KVM_RUN).  Read the VM-wide clock last, the vCPUs first: the
    clock then covers their TSCs."""
    if hasattr(vm, "complete_pending"):
        vm.complete_pending()           # no vCPU saved in the middle of an instruction
    msr_list = msr_index_list(vm)
    n = len(getattr(vm, "vcpus", ())) or 1

    def msrs(i):
        return {str(k): v for k, v in get_msrs(vm, msr_list, i).items()}
    others = [{"classes": {cls.name: blob(get(vm, cls.name, i)) for cls in CLASSES
                           if cls.fd == VCPU and available(vm, cls)},
               "msrs": msrs(i)} for i in range(1, n)]
    classes = {}
    for cls in CLASSES:
        if available(vm, cls):
            classes[cls.name] = blob(get(vm, cls.name))
    out = {"classes": classes, "msrs": msrs(0)}
    if others:
        out["vcpus"] = others
    return out


# Restore order matters to KVM: sregs before regs (mode), the LAPIC before
# the events (a pending interrupt is checked against it), MSRs after sregs
# (EFER), mp_state last (it may make the vCPU runnable), the irqchips and
# PIT before the vCPU state that refers to them.
RESTORE_ORDER = ("pic_master", "pic_slave", "ioapic", "pit2", "clock", "sregs", "regs", "fpu", "xsave",
                 "xcrs", "lapic", "debugregs", "msrs", "events", "mp_state")


def restore(vm, state: dict) -> list[int]:
    """Write back what :func:`save` returned, in ``RESTORE_ORDER`` (the VM
    and vCPU 0, then each other vCPU's classes in the same order), every
    field checked first (``STATE``: FieldError); returns the MSRs KVM
    refused; a class KVM refuses is a KvmError, a state for another number
    of vCPUs a ValueError.  The clock's host-time fields are cleared: they
    describe the saving host's moment, and KVM_SET_CLOCK with them set
    would try to advance the clock by the time the snapshot sat on disk."""
    state = check(STATE, state, "kvm")
    others = state.get("vcpus") or []       # absent (None) for one vCPU
    n = len(getattr(vm, "vcpus", ())) or 1
    if len(others) != n - 1:
        raise ValueError(f"the state is of {len(others) + 1} vCPUs, this machine has {n}")
    refused = set(_restore_one(vm, state, 0, vm_classes=True))
    for i, one in enumerate(others, 1):
        refused |= set(_restore_one(vm, one, i, vm_classes=False))
    return sorted(refused)


def _restore_one(vm, state: dict, vcpu: int, vm_classes: bool) -> list[int]:
    refused = []
    classes = state["classes"]
    for name in RESTORE_ORDER:
        if name == "msrs":
            refused = set_msrs(vm, state["msrs"], vcpu)
            continue
        if BY_NAME[name].fd != VCPU and not vm_classes:
            continue
        data = classes.get(name)
        if data is None:
            continue
        if name == "clock":
            data = _clock_without_host_time(data)
        put(vm, name, data, vcpu)
    return refused


def _clock_without_host_time(data: bytes) -> bytes:
    b = bytearray(data)
    flags = int.from_bytes(b[8:12], "little") & ~(KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
    b[8:12] = flags.to_bytes(4, "little")
    return bytes(b)


def probe(vm) -> dict[str, str]:
    """Per state class: "ok" when this host gets it and takes the same value
    back, else why not.  Plus "msrs": how many of the index list round-trip."""
    out = {}
    for cls in CLASSES:
        if not available(vm, cls):
            out[cls.name] = "capability missing"
            continue
        try:
            data = get(vm, cls.name)
        except KvmError as e:
            out[cls.name] = f"get refused ({os.strerror(e.errno)})"
            continue
        try:
            put(vm, cls.name, _clock_without_host_time(data) if cls.name == "clock" else data)
        except KvmError as e:
            out[cls.name] = f"set refused ({os.strerror(e.errno)})"
            continue
        out[cls.name] = "ok"
    idx = msr_index_list(vm)
    got = get_msrs(vm, idx)
    refused = set_msrs(vm, got)
    out["msrs"] = (f"{len(got) - len(refused)} of {len(idx)} round-trip"
                   + (f"; unreadable {sorted(hex(i) for i in idx if i not in got)}" if len(got) < len(idx) else "")
                   + (f"; set refused {[hex(i) for i in refused]}" if refused else ""))
    return out


__all__ = ["STATE", "CLASSES", "StateClass", "get", "put", "save", "restore", "probe", "msr_index_list", "get_msrs",
           "set_msrs", "RESTORE_ORDER", "MSR_IA32_TSC"]
