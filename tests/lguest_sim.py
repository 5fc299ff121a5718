"""A simulated /dev/lguest and a guest CPU that turns device accesses into traps.

``SimulatedLguest`` answers the launcher's requests as lguest_user.c does
(INITIALIZE once and first, GETREG/SETREG on the i386 user_regs_struct,
TRAP, IRQ; a death reason readable after ENOENT; ERESTART) and records every
request.  The guest runs in another thread: :meth:`SimulatedLguest.execute`
puts an instruction at EIP in guest memory, makes the launcher's blocked
``pread`` return the trap (with the first 7 instruction bytes, as the host
kernel copies them) and waits until the launcher reads again -- the moment
the real guest would resume.

``TrappedBus`` is a ``bus`` for guest-side code (``VirtioPciDriver``): each
``pio``/``mmio`` becomes a real x86 instruction (``in``/``out``/``mov``
encodings from :func:`pio_insn`/:func:`mmio_insn`) executed through the
simulator, and checks what the launcher did to the registers.  A driver
given a TrappedBus has no other way to reach the devices.
"""
from __future__ import annotations

import errno
import itertools
import threading
import time

from lguest_jit.hw import lguest as lg

KERNEL_CS = 0x61      # lguest guest kernel: GDT entry 12, RPL 1
USER_CS = 0x73        # guest user mode: RPL 3
CODE_PHYS = 0x80000   # where the guest's "program" lives (kernel virtual = + 0xC0000000)
CODE_SPAN = 0x10000


class SimulatedLguest:
    def __init__(self, gm, word_bytes: int = lg.WORD_BYTES, timeout: float = 10.0):
        self.gm, self.word, self.timeout = gm, word_bytes, timeout
        self.regs = [0] * len(lg.USER_REGS)
        self.regs[lg.REG["xcs"] // 4] = KERNEL_CS
        self.regs[lg.REG["eflags"] // 4] = 0x202
        self.regs[lg.REG["eip"] // 4] = lg.GUEST_PAGE_OFFSET + CODE_PHYS
        self.init = None
        self.records: list[tuple] = []
        self.irqs: dict[int, int] = {}
        self.traps = {lg.TRAP_GPF: 0, lg.TRAP_PAGE_FAULT: 0}
        self._cv = threading.Condition()
        self._pending = None        # bytes the next run-pread returns
        self._resumed = 0           # run-preads so far: each one resumes the guest
        self._waiting = False       # the launcher is blocked in a run-pread
        self._reg_read = None
        self._death = None
        self._death_told = False
        self._restart = False
        self._interrupt = False
        self.reinjected = None      # trap number re-injected for the current instruction

    # -- the device side (what the launcher calls) ---------------------------

    def _words(self, data):
        try:
            return lg.decode_request(data, self.word)
        except ValueError:
            raise OSError(errno.EINVAL, "malformed request") from None

    def write(self, data: bytes) -> int:
        w = self._words(data)
        with self._cv:
            if w[0] == lg.LHREQ_INITIALIZE:
                if self.init is not None:
                    raise OSError(errno.EBUSY, "already initialized")
                if len(w) != 5:
                    raise OSError(errno.EINVAL, "LHREQ_INITIALIZE takes four words")
                self.init = w[1:]
                self.records.append(("init", *w[1:]))
                return len(data)
            if self.init is None:
                raise OSError(errno.EINVAL, "not initialized")
            if w[0] == lg.LHREQ_IRQ and len(w) == 2:
                if w[1] >= lg.LGUEST_IRQS:
                    raise OSError(errno.EINVAL, "no such interrupt")
                self.irqs[w[1]] = self.irqs.get(w[1], 0) + 1
                self.records.append(("irq", w[1]))
                self._cv.notify_all()
                return 0
            if w[0] == lg.LHREQ_TRAP and len(w) == 2:
                if w[1] > 255:
                    raise OSError(errno.EINVAL, "no such trap")
                self.reinjected = w[1]
                self.records.append(("trap", w[1]))
                return 0
            raise OSError(errno.EINVAL, f"request {w[0]} not accepted by write()")

    def pwrite(self, data: bytes, offset: int) -> int:
        w = self._words(data)
        with self._cv:
            if self.init is None or offset != 0:
                raise OSError(errno.EINVAL, "not initialized / no such cpu")
            if w[0] == lg.LHREQ_GETREG and len(w) == 2:
                off = self._regoff(w[1])
                self._reg_read = self.regs[off // 4]
                self.records.append(("getreg", off))
                return 0
            if w[0] == lg.LHREQ_SETREG and len(w) == 3:
                off = self._regoff(w[1])
                if w[2] >> 32:
                    raise OSError(errno.EINVAL, "register value wider than 32 bits")
                self.regs[off // 4] = w[2]
                self.records.append(("setreg", off, w[2]))
                return 0
            raise OSError(errno.EINVAL, f"request {w[0]} not accepted by pwrite()")

    @staticmethod
    def _regoff(off):
        if off % 4 or off >= lg.USER_REGS_SIZE:
            raise OSError(errno.EINVAL, f"bad register offset {off}")
        return off

    def pread(self, size: int, offset: int) -> bytes:
        with self._cv:
            if self.init is None or offset != 0:
                raise OSError(errno.EINVAL, "not initialized / no such cpu")
            if self._reg_read is not None:
                v, self._reg_read = self._reg_read, None
                return v.to_bytes(self.word, "little")[:size]
            if self._death is not None and self._death_told:
                return (self._death.encode() + b"\0")[:size]
            # A run: the guest resumes after the previous trap.
            self._resumed += 1
            self._waiting = True
            self._cv.notify_all()
            deadline = time.monotonic() + self.timeout
            try:
                while self._pending is None and self._death is None and not self._restart and not self._interrupt:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise OSError(errno.ETIMEDOUT, "simulated guest posted no trap")
                    self._cv.wait(left)
            finally:
                self._waiting = False
            if self._interrupt:
                self._interrupt = False
                raise InterruptedError(errno.EINTR, "interrupted")
            if self._death is not None:
                self._death_told = True
                raise OSError(errno.ENOENT, "guest died")
            if self._restart:
                raise OSError(errno.ERESTART, "restart")
            data, self._pending = self._pending, None
            return data

    def interrupt(self) -> None:
        with self._cv:
            self._interrupt = True
            self._cv.notify_all()

    # -- the guest side -------------------------------------------------------

    def reg(self, name: str) -> int:
        return self.regs[lg.REG[name] // 4]

    def snapshot(self) -> dict:
        with self._cv:
            return {n: self.regs[i] for i, n in enumerate(lg.USER_REGS)}

    def execute(self, trap: int, insn: bytes, addr: int = 0, regs: dict | None = None,
                memory_insn: bytes | None = None, store: bool = True) -> dict:
        """Run one trapping instruction: registers set, ``insn`` stored at
        EIP's linear-map address (or ``memory_insn``, to make memory disagree
        with the host's copy; nothing with ``store=False``), the trap handed
        to the launcher; returns the registers once it resumed the guest."""
        with self._cv:
            # The guest runs only while the launcher sits in its run-pread.
            if not self._cv.wait_for(lambda: self._waiting, self.timeout):
                raise TimeoutError("the launcher is not running the guest")
            for name, v in (regs or {}).items():
                self.regs[lg.REG[name] // 4] = v & 0xFFFFFFFF
            eip = self.regs[lg.REG["eip"] // 4]
            if store:
                phys = eip - lg.GUEST_PAGE_OFFSET
                self.gm.write(phys, insn if memory_insn is None else memory_insn)
                # The host copies exactly sizeof(insn) bytes from EIP.
                copied = self.gm.read(phys, lg.PENDING_INSN_BYTES)
            else:   # code outside the kernel's linear map (user space, say)
                copied = insn[:lg.PENDING_INSN_BYTES].ljust(lg.PENDING_INSN_BYTES, b"\0")
            seen = self._resumed
            self._post(trap, copied, addr)
            deadline = time.monotonic() + self.timeout
            while self._resumed == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the launcher did not resume the guest")
                self._cv.wait(left)
            return {n: self.regs[i] for i, n in enumerate(lg.USER_REGS)}

    def _post(self, trap: int, insn7: bytes, addr: int) -> None:
        self.reinjected = None
        self._pending = lg.PENDING.pack(trap, insn7, addr)
        self.traps[trap] = self.traps.get(trap, 0) + 1
        self._cv.notify_all()

    def post(self, trap: int, insn7: bytes = bytes(7), addr: int = 0) -> None:
        """Hand the launcher a raw pending trap without waiting for it."""
        with self._cv:
            self._post(trap, insn7, addr)

    def wait_irq(self, line: int, seen: int, timeout: float) -> int:
        """Interrupts raised on ``line`` so far, once more than ``seen``
        (or when ``timeout`` passes)."""
        with self._cv:
            self._cv.wait_for(lambda: self.irqs.get(line, 0) > seen, timeout)
            return self.irqs.get(line, 0)

    def die(self, reason: str) -> None:
        with self._cv:
            self._death = reason
            self._cv.notify_all()

    def request_restart(self) -> None:
        with self._cv:
            self._restart = True
            self._cv.notify_all()

    def close(self) -> None:
        self.die("simulator closed")


# ---------------------------------------------------------------------------
# A tiny assembler for the instructions a guest uses on devices

_REG_NAMES = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


def pio_insn(is_write: bool, width: int, imm_port: int | None = None) -> bytes:
    """``in``/``out`` of AL/AX/EAX with the port in DX, or an imm8 port."""
    op = (0xE4 if imm_port is not None else 0xEC) | (2 if is_write else 0) | (0 if width == 1 else 1)
    prefix = b"\x66" if width == 2 else b""
    return prefix + bytes([op]) + (bytes([imm_port]) if imm_port is not None else b"")


# Memory operand forms: (mod, rm, sib or None, displacement bytes).  The
# address comes from the fault, so base/index registers are decoration.
FORMS = {
    "disp32": (0, 5, None, 4),          # [disp32]
    "base": (0, 3, None, 0),            # [ebx]
    "disp8": (1, 6, None, 1),           # [esi+disp8]
    "base_disp32": (2, 7, None, 4),     # [edi+disp32]
    "sib": (0, 4, 0x4B, 0),             # [ebx+ecx*2]
    "sib_disp8": (1, 4, 0x8E, 1),       # [esi+ecx*4+disp8]
    "sib_disp32": (2, 4, 0xC3, 4),      # [ebx+eax*8+disp32]
}


def mmio_insn(is_write: bool, width: int, reg: int, high: bool = False, form: str = "disp32",
              disp: int = 0) -> bytes:
    """``mov`` between register ``reg`` (x86 number; with ``high`` and width
    1 one of AH/CH/DH/BH) and memory."""
    mod, rm, sib, dlen = FORMS[form]
    field = reg + 4 if high else reg
    op = (0x88 if is_write else 0x8A) | (0 if width == 1 else 1)
    out = (b"\x66" if width == 2 else b"") + bytes([op, mod << 6 | field << 3 | rm])
    if sib is not None:
        out += bytes([sib])
    return out + (disp & ((1 << 8 * dlen) - 1)).to_bytes(dlen, "little")


class TrappedBus:
    """What a guest driver sees: every access is an instruction that traps."""

    def __init__(self, sim: SimulatedLguest):
        self.sim = sim
        self.cursor = 0
        self.n = 0
        self.accesses: list[tuple] = []     # ("pio"|"mmio", where, size, is_write, value)
        self._regs = itertools.cycle((0, 1, 2, 3, 6, 7, 5))    # every register but esp
        self._forms = itertools.cycle(FORMS)
        self.junk = 0xA5C3F00D

    @staticmethod
    def check(cond, what):
        if not cond:
            raise AssertionError(what)

    def _next_eip(self, length):
        if self.cursor + length > CODE_SPAN:
            self.cursor = 0
        eip = lg.GUEST_PAGE_OFFSET + CODE_PHYS + self.cursor
        self.cursor += length
        return eip

    def _run(self, trap, insn, addr, regs, changed):
        self.n += 1
        eip = self._next_eip(len(insn))
        regs = dict(regs, eip=eip)
        before = {**self.sim.snapshot(), **{k: v & 0xFFFFFFFF for k, v in regs.items()}}
        after = self.sim.execute(trap, insn, addr, regs)
        self.check(self.sim.reinjected is None, f"launcher re-injected trap {self.sim.reinjected} for {insn.hex(' ')}")
        self.check(after["eip"] == eip + len(insn), f"EIP {after['eip']:#x} after {insn.hex(' ')} at {eip:#x}")
        for name in lg.USER_REGS:
            if name not in ("eip", *changed):
                self.check(after[name] == before[name], f"{name} changed by {insn.hex(' ')}")
        return before, after

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        self.accesses.append(("pio", port, size, is_write, value))
        imm = port if port < 0x100 and self.n % 2 else None
        insn = pio_insn(is_write, size, imm)
        junk = (self.junk * (self.n + 1)) & 0xFFFFFFFF
        mask = (1 << 8 * size) - 1
        # Bits of EDX above the port and of EAX above the width must not matter.
        eax = (junk & ~mask) | (value & mask) if is_write else junk
        before, after = self._run(lg.TRAP_GPF, insn, 0, {"eax": eax, "edx": (junk & 0xFFFF0000) | port},
                                  () if is_write else ("eax",))
        if is_write:
            return 0
        if size < 4:
            self.check(after["eax"] & ~mask == before["eax"] & ~mask, "in clobbered EAX above its width")
        return after["eax"] & mask

    def mmio(self, addr: int, size: int, is_write: bool, value: int) -> int:
        self.accesses.append(("mmio", addr, size, is_write, value))
        form = next(self._forms)
        reg = next(self._regs)
        if size == 1:
            reg &= 3        # byte ops reach only AL..BL and AH..BH
        high = size == 1 and self.n % 3 == 0
        insn = mmio_insn(is_write, size, reg, high, form, disp=addr)
        name = _REG_NAMES[reg]
        junk = (self.junk * (self.n + 7)) & 0xFFFFFFFF
        mask = (1 << 8 * size) - 1
        shift = 8 if high else 0
        if is_write:
            r = (junk & ~(mask << shift)) | ((value & mask) << shift)
        else:
            r = junk
        before, after = self._run(lg.TRAP_PAGE_FAULT, insn, addr, {name: r}, () if is_write else (name,))
        if is_write:
            return 0
        if size < 4:
            self.check(after[name] & ~(mask << shift) == before[name] & ~(mask << shift),
                       f"mov to {'high ' if high else ''}{name} clobbered bits outside the operand")
        return (after[name] >> shift) & mask

    def interrupts(self) -> list:
        return []       # the guest takes interrupts from the host, not eventfds

