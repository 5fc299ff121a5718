"""What a backend's ``run()`` gives back, whichever hypervisor ran the guest.

Both backends (:mod:`lguest_jit.hw.kvm`, :mod:`lguest_jit.hw.lguest`)
import these; the launcher reads them without knowing which one ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunResult:
    """Why a backend's ``run`` returned.

    ``reason`` is one of: ``poweroff`` (guest asked to power off),
    ``reboot`` (guest asked to reset: the launcher restarts it), ``halt``
    (HLT with interrupts off: nothing can ever wake the guest), ``stopped``
    (``stop()`` from another thread, or a run limit), ``timeout``,
    ``shutdown`` (triple fault), ``died`` (lguest: the host killed the guest;
    ``message`` is its reason), ``internal-error`` (an instruction or trap
    the backend cannot handle), ``fail-entry``, ``unknown-exit``.
    """
    reason: str
    message: str = ""
    regs: dict | None = None
    insn: bytes | None = None

    @property
    def exit_status(self) -> int | None:
        """Launcher exit status: 0 for a clean end, None for "restart", 1 otherwise."""
        if self.reason in ("poweroff", "halt", "stopped"):
            return 0
        if self.reason == "reboot":
            return None
        return 1

    def report(self) -> str:
        """Human-readable lines for the console (instruction bytes, registers)."""
        lines = [f"{self.reason}: {self.message}"]
        if self.insn is not None:
            lines.append("instruction bytes: " + (self.insn.hex(" ") or "(none)"))
        if self.regs:
            items = [f"{k}={v:#018x}" for k, v in self.regs.items()]
            for i in range(0, len(items), 4):
                lines.append("  " + " ".join(items[i:i + 4]))
        return "\n".join(lines)


@dataclass
class ExitStats:
    """Counters kept by the vCPU loop: exits (KVM) or traps (lguest) by
    kind.  pio/mmio/total are added when a run returns; intr and assists as
    they happen."""
    pio: int = 0
    mmio: int = 0
    intr: int = 0
    assists: dict = field(default_factory=dict)   # name -> count
    total: int = 0
