"""Which hypervisors this host offers, answered without importing Numba or
numpy: the CLI asks before it loads the engine (``--help`` and argument
errors must stay fast)."""
from __future__ import annotations

import os

LGUEST_DEVICE = "/dev/lguest"


def lguest_available(dev: str = LGUEST_DEVICE) -> bool:
    """True when this host has the lguest device (no current kernel does)."""
    return os.path.exists(dev)


DEFAULT_SAMPLE_HZ = 1000
MAX_SAMPLE_HZ = 10000     # beyond this the profiler's exits would be what it measures


def max_sample_hz() -> int:
    """The highest profiling rate this host's monotonic clock can time (its
    resolution), at most MAX_SAMPLE_HZ."""
    import time
    res = time.clock_getres(time.CLOCK_MONOTONIC)
    return MAX_SAMPLE_HZ if res <= 0 else max(1, min(MAX_SAMPLE_HZ, int(1.0 / res)))


def default_sample_hz() -> int:
    """DEFAULT_SAMPLE_HZ where the host's clock allows it, else the most it allows."""
    return min(DEFAULT_SAMPLE_HZ, max_sample_hz())


KVM_DEVICE = "/dev/kvm"
# KVM_CHECK_EXTENSION (hw/kvm.py) and the two vCPU-count capabilities,
# here so the CLI can check --cpus before it loads the engine.
_KVM_CHECK_EXTENSION = 0xAE03          # _IO(KVMIO 0xAE, 0x03)
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_DEFAULT_MAX_VCPUS = 4              # what KVM's API doc says to assume when neither capability answers


def kvm_max_vcpus(dev: str = KVM_DEVICE) -> int | None:
    """The most vCPUs one VM may have on this host's KVM: KVM_CAP_MAX_VCPUS,
    else KVM_CAP_NR_VCPUS, else 4 (KVM's api.rst, KVM_CREATE_VCPU); None
    when ``dev`` cannot be opened."""
    import fcntl
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for cap in (KVM_CAP_MAX_VCPUS, KVM_CAP_NR_VCPUS):
            try:
                n = fcntl.ioctl(fd, _KVM_CHECK_EXTENSION, cap)
            except OSError:
                n = 0
            if n > 0:
                return n
        return KVM_DEFAULT_MAX_VCPUS
    finally:
        os.close(fd)


def usable_cpus() -> int:
    """Host CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def software_kvm(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Why this host's /dev/kvm runs guest kernel code in KVM's instruction
    emulator (a software KVM such as kvm_pvm), or None when it is (or may
    be) hardware virtualization.  Guest user code runs natively on both."""
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return "kvm_pvm (software KVM): guest kernel code is emulated, guest user code runs natively"
    if any(os.path.isdir(os.path.join(sys_module, m)) for m in ("kvm_intel", "kvm_amd")):
        return None
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if os.path.isdir(os.path.join(sys_module, "kvm")) and flags is not None and not {"vmx", "svm"} & set(flags):
        return "KVM without VT-x/AMD-V (no kvm_intel or kvm_amd): guest kernel code is emulated"
    return None
