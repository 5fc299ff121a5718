"""Tiny test guests for the KVM backend: a minimal x86-64 assembler for the
handful of instructions the tests and the exit benchmark need, and the
long-mode machine state (page tables, GDT, TSS, IDT) to run them.

On our software-KVM hosts code at CPL3 runs natively while CPL0 code is
emulated at ~2M instructions/s, so the guests here run at CPL3 with IOPL=3
(``in``/``out``/``cli``/``sti`` allowed) and keep CPL0 code (interrupt
handlers) to a few instructions.

Guest physical layout (everything below 1 MiB, guest RAM >= 1 MiB):

  0x1000 PML4   0x2000 PDPT   0x3000-0x6fff four PDs: 0-4 GiB identity, 2 MiB
  pages, user-accessible (so CPL3 code reaches RAM and the MMIO window)
  0x7000 GDT    0x8000 IDT    0x9000 TSS    0xc000 CPL0 stack top
  0x10000 code  0x20000 data  0x80000 CPL3 stack top
"""
from __future__ import annotations

import struct

from .kvm import flat_segment, kvm_regs
from .x86 import CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME

PML4, PDPT, PD0 = 0x1000, 0x2000, 0x3000
GDT, IDT, TSS = 0x7000, 0x8000, 0x9000
KSTACK_TOP = 0xC000
CODE = 0x10000
DATA = 0x20000
USTACK_TOP = 0x80000

# GDT selectors (index * 8 | RPL)
SEL_KCODE, SEL_KDATA, SEL_UDATA, SEL_UCODE, SEL_TSS = 0x08, 0x10, 0x18 | 3, 0x20 | 3, 0x28

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


class Asm:
    """Just enough x86-64 encoding for test guests, with labels for short
    jumps.  Every method appends one instruction; ``bytes(asm)`` is the code."""

    def __init__(self, origin: int = CODE):
        self.origin = origin
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def __bytes__(self):
        for at, name in self.fixups:
            rel = self.labels[name] - (at + 1)
            if not -128 <= rel <= 127:
                raise ValueError(f"short jump to {name} out of range ({rel})")
            self.buf[at] = rel & 0xFF
        return bytes(self.buf)

    def here(self) -> int:
        return self.origin + len(self.buf)

    def label(self, name: str) -> "Asm":
        self.labels[name] = len(self.buf)
        return self

    def raw(self, b: bytes) -> "Asm":
        self.buf += b
        return self

    def _jcc(self, opcode: int, name: str) -> "Asm":
        self.buf += bytes([opcode, 0])
        self.fixups.append((len(self.buf) - 1, name))
        return self

    def jmp(self, name):   # EB rel8
        return self._jcc(0xEB, name)

    def jz(self, name):    # 74 rel8
        return self._jcc(0x74, name)

    def jnz(self, name):   # 75 rel8
        return self._jcc(0x75, name)

    def mov_imm32(self, reg: int, imm: int) -> "Asm":
        """mov r32, imm32 (B8+r; zero-extends into the 64-bit register)."""
        return self.raw(bytes([0xB8 + reg]) + struct.pack("<I", imm & 0xFFFFFFFF))

    def mov_imm64(self, reg: int, imm: int) -> "Asm":
        """mov r64, imm64 (REX.W B8+r)."""
        return self.raw(bytes([0x48, 0xB8 + reg]) + struct.pack("<Q", imm & 0xFFFFFFFFFFFFFFFF))

    def out(self, size: int) -> "Asm":
        """out dx, al/ax/eax."""
        return self.raw({1: b"\xee", 2: b"\x66\xef", 4: b"\xef"}[size])

    def inp(self, size: int) -> "Asm":
        """in al/ax/eax, dx."""
        return self.raw({1: b"\xec", 2: b"\x66\xed", 4: b"\xed"}[size])

    def store_rdi(self, size: int) -> "Asm":
        """mov [rdi], al/ax/eax/rax."""
        return self.raw({1: b"\x88\x07", 2: b"\x66\x89\x07", 4: b"\x89\x07", 8: b"\x48\x89\x07"}[size])

    def load_rdi(self, size: int) -> "Asm":
        """mov al/ax/eax/rax, [rdi] (al/ax leave the upper bits alone)."""
        return self.raw({1: b"\x8a\x07", 2: b"\x66\x8b\x07", 4: b"\x8b\x07", 8: b"\x48\x8b\x07"}[size])

    def store_at(self, size: int, disp: int) -> "Asm":
        """mov [rdi+disp32], al/ax/eax/rax (ModRM 0x87: rdi base, disp32)."""
        op = {1: b"\x88", 2: b"\x66\x89", 4: b"\x89", 8: b"\x48\x89"}[size]
        return self.raw(op + b"\x87" + struct.pack("<i", disp))

    def load_at(self, size: int, disp: int) -> "Asm":
        """mov al/ax/eax/rax, [rdi+disp32]."""
        op = {1: b"\x8a", 2: b"\x66\x8b", 4: b"\x8b", 8: b"\x48\x8b"}[size]
        return self.raw(op + b"\x87" + struct.pack("<i", disp))

    def store_rsi_rax(self) -> "Asm":
        """mov [rsi], rax."""
        return self.raw(b"\x48\x89\x06")

    def add_rsi_8(self) -> "Asm":
        """add rsi, 8."""
        return self.raw(b"\x48\x83\xc6\x08")

    def cmp_byte_rdi_0(self) -> "Asm":
        """cmp byte [rdi], 0."""
        return self.raw(b"\x80\x3f\x00")

    def dec_ecx(self) -> "Asm":
        return self.raw(b"\xff\xc9")

    def rep_outsb(self) -> "Asm":
        return self.raw(b"\xf3\x6e")

    def rep_insb(self) -> "Asm":
        return self.raw(b"\xf3\x6c")

    def hlt(self):
        return self.raw(b"\xf4")

    def cli(self):
        return self.raw(b"\xfa")

    def sti(self):
        return self.raw(b"\xfb")

    def nop(self):
        return self.raw(b"\x90")

    def int3(self):
        return self.raw(b"\xcc")

    def fwait(self):
        return self.raw(b"\x9b")

    def iretq(self):
        return self.raw(b"\x48\xcf")

    def push_rax(self):
        return self.raw(b"\x50")

    def pop_rax(self):
        return self.raw(b"\x58")

    def push_rdx(self):
        return self.raw(b"\x52")

    def pop_rdx(self):
        return self.raw(b"\x5a")

    def push_rdi(self):
        return self.raw(b"\x57")

    def pop_rdi(self):
        return self.raw(b"\x5f")


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte GDT entry: ``access`` is P|DPL|S|type, ``flags`` G|D/B|L|AVL."""
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((flags & 0xF) << 4) | ((limit >> 16) & 0xF), (base >> 24) & 0xFF)


def _gate(handler: int, selector: int = SEL_KCODE, dpl: int = 3) -> bytes:
    """A 16-byte 64-bit interrupt gate (type 0xE: IF cleared on entry)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x80 | (dpl << 5) | 0xE,
                       (handler >> 16) & 0xFFFF, (handler >> 32) & 0xFFFFFFFF, 0)


def setup_long_mode(vm, code: bytes, *, cpl: int = 3, handlers: dict | None = None,
                    entry: int = CODE, regs: dict | None = None, vcpu: int = 0) -> None:
    """Write page tables, GDT, TSS, IDT and ``code`` (at ``CODE``) into the
    VM's memory and set the vCPU to run it in 64-bit mode at ``cpl`` (3 or
    0) with IOPL=3 and interrupts off.  ``handlers`` maps interrupt vectors
    to CPL0 handler addresses (code the caller placed in guest memory).
    ``regs`` sets initial general registers by name.  ``vcpu``: which
    vCPU (another one straight into long mode, no INIT/SIPI: give it its
    own ``entry`` and stack in ``regs``)."""
    gm = vm.gm
    if gm.size < 0x100000:
        raise ValueError("tiny guests need at least 1 MiB of guest RAM")
    gm.write(PML4, struct.pack("<Q", PDPT | 0x7))                 # P|RW|US
    gm.write(PDPT, b"".join(struct.pack("<Q", (PD0 + i * 0x1000) | 0x7) for i in range(4)))
    gm.write(PD0, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(4 * 512)))  # P|RW|US|PS
    tss_desc = _descriptor(TSS, 0x67, 0x89, 0x0) + struct.pack("<II", 0, 0)   # 64-bit available TSS
    gm.write(GDT, b"".join([
        b"\0" * 8,
        _descriptor(0, 0xFFFFF, 0x9B, 0xA),   # 0x08 kernel code: P, DPL0, code exec/read, G|L
        _descriptor(0, 0xFFFFF, 0x93, 0xC),   # 0x10 kernel data: G|D
        _descriptor(0, 0xFFFFF, 0xF3, 0xC),   # 0x18 user data, DPL3
        _descriptor(0, 0xFFFFF, 0xFB, 0xA),   # 0x20 user code, DPL3, L
        tss_desc,                              # 0x28
    ]))
    gm.write(TSS, b"\0" * 0x68)
    gm.write(TSS + 4, struct.pack("<Q", KSTACK_TOP))             # RSP0
    gm.write(TSS + 0x66, struct.pack("<H", 0x68))                # no I/O bitmap
    idt = bytearray(256 * 16)
    for vec, addr in (handlers or {}).items():
        idt[vec * 16:vec * 16 + 16] = _gate(addr)
    gm.write(IDT, bytes(idt))
    gm.write(CODE, code)

    s = vm.get_sregs(vcpu)
    user = cpl == 3
    s.cs = flat_segment(SEL_UCODE if user else SEL_KCODE, code=True, long_mode=True, dpl=cpl)
    data = flat_segment(SEL_UDATA if user else SEL_KDATA, code=False, dpl=cpl)
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.tr.base, s.tr.limit, s.tr.selector = TSS, 0x67, SEL_TSS
    s.tr.type, s.tr.present, s.tr.s, s.tr.dpl, s.tr.g, s.tr.unusable = 0xB, 1, 0, 0, 0, 0   # busy 64-bit TSS
    s.ldt.unusable, s.ldt.present, s.ldt.type, s.ldt.selector = 1, 0, 0x2, 0
    s.gdt.base, s.gdt.limit = GDT, 6 * 8 + 8 - 1
    s.idt.base, s.idt.limit = IDT, 256 * 16 - 1
    s.cr3 = PML4
    s.cr4 = CR4_PAE
    s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    s.efer = EFER_LME | EFER_LMA
    vm.set_sregs(s, vcpu)
    vm.make_runnable(vcpu)
    r = kvm_regs()
    r.rip = entry
    r.rsp = USTACK_TOP if user else KSTACK_TOP
    r.rflags = 0x2 | (3 << 12)      # IOPL=3: port I/O and cli/sti at CPL3
    for name, value in (regs or {}).items():
        setattr(r, name, value)
    vm.set_regs(r, vcpu)


__all__ = ["Asm", "setup_long_mode", "CODE", "DATA", "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
           "SEL_KCODE", "SEL_UCODE", "KSTACK_TOP", "USTACK_TOP"]
