"""Decoders for the x86 instructions a guest uses to touch devices.

When a guest touches a device the hypervisor stops it and hands the launcher
the faulting instruction: lguest reflects a general-protection fault for port
I/O (``emulate_insn``) and a page fault for MMIO (``emulate_mmio``); KVM asks
for help when its own emulator gives up.  The launcher then has to know how
long the instruction is, which register it moves, how wide the access is and
in which direction.  lguest answered that with a dozen lines that are wrong
in 32-bit code (they skip no SIB byte, read a 16-bit displacement for
mod=00 r/m=101, and honour ``0x66`` only on 89/8B).  These decoders answer it
exactly for the families below and *refuse* everything else: a refused
instruction becomes a fault reflected into the guest, a mis-decoded one
corrupts a register or skips the wrong number of bytes.

Supported
---------
Port I/O (:func:`decode_pio`; the same in 32- and 64-bit code):
  ``E4``/``E5`` in from imm8 port, ``E6``/``E7`` out to imm8 port,
  ``EC``/``ED`` in from port DX, ``EE``/``EF`` out to port DX, with at most
  one ``0x66`` operand-size prefix (16-bit eAX form; ignored, as by the CPU,
  on the AL forms); a bare ``FA`` (``cli``), which lguest skips.
MMIO (:func:`decode_mmio`):
  ``88``/``89`` store a register to memory, ``8A``/``8B`` load memory into a
  register, with every ModRM memory form: SIB bytes, 8/16/32-bit
  displacements, 16-bit addressing under ``0x67`` in 32-bit code and 32-bit
  addressing under ``0x67`` in 64-bit code, RIP-relative in 64-bit mode.
  Prefixes: at most one ``0x66``, one segment override (26 2E 36 3E 64 65)
  and one ``0x67``, in any order; in 64-bit mode one REX prefix (40-4F)
  immediately before the opcode (W: 8-byte access, R: r8-r15, X/B only
  change the address, which the caller takes from the fault).

Refused: ``lock``/``rep``/``repne`` (F0 F2 F3), a prefix repeated, a REX
byte that does not immediately precede the opcode (the CPU ignores such a
REX; we do not model that), register-form ModRM (mod=11: no memory operand,
so it cannot have faulted on MMIO), ``cli`` with prefixes, every other
opcode, and anything running past the bytes supplied.

Result
------
Both decoders return a :class:`Decoded` named tuple
``(length, reg, width, is_write, port, high)``:

``length``
    instruction length in bytes (1..15) -- add it to eIP to skip the
    instruction.  ``length <= 0`` means "cannot decode": ``-length`` is an
    ``E_*`` code and :func:`error_message` says which rule refused it; the
    other fields are then ``(-1, 0, 0, -1, 0)``.
``reg``
    register number in x86 encoding order: 0=eAX 1=eCX 2=eDX 3=eBX 4=eSP
    5=eBP 6=eSI 7=eDI, 8..15 = r8..r15.  Always 0 (AL/AX/EAX) for port I/O,
    -1 for ``cli``.
``width``
    access size in bytes: 1, 2, 4 or 8 (8 only with REX.W in 64-bit mode).
    ``width == 0`` (with ``length == 1``) is ``cli``: no access, just skip it.
``is_write``
    1 when the guest writes to the device (``out``, or a ``mov`` to memory),
    0 when it reads (``in``, or a ``mov`` from memory).
``port``
    port I/O only: the immediate port number, or -1 for "the port is in DX".
    Always -1 for MMIO (the address comes from the fault, not the bytes).
``high``
    1 for the legacy 8-bit high registers AH, CH, DH, BH (``reg`` is then
    0..3 and the operand is bits 8..15 of that register); 0 otherwise.  With
    any REX prefix, byte registers 4..7 are SPL/BPL/SIL/DIL and ``high`` is 0.

Register helpers
----------------
:func:`register_operand` extracts the value a store or ``out`` writes;
:func:`merge_register` folds a value read from a device into the old register
value: 1- and 2-byte reads merge into the low byte/word (or bits 8..15 for a
high register) and keep the rest, a 4-byte read zero-extends (what a 32-bit
register write does in 64-bit mode; in 32-bit code the upper half of a KVM
register is not architecturally visible, so zero-extending is right there
too), an 8-byte read replaces the register.

Kernels ``_decode_mmio(buf, n, mode64)`` and ``_decode_pio(buf, n)`` take a
uint8 array and return the same six fields as a plain int64 tuple, so a
backend's own kernel can decode without a Python round trip; the bulk forms
fill (N, 6) int64 arrays (columns ``D_*``).  ``_merge_register`` and
``_register_operand`` work on int64 two's-complement register values.  None
of them raises or reads past ``min(n, buf.size, 15)`` bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

MAX_INSN_LEN = 15  # SDM Vol. 2A §2.3.11: longer instructions raise #GP

# Columns of the bulk result arrays (the same order as Decoded).
D_LENGTH = 0
D_REG = 1
D_WIDTH = 2
D_IS_WRITE = 3
D_PORT = 4
D_HIGH = 5
D_COLUMNS = 6

# The PS/2 controller status port: lguest answers 1 ("output buffer full")
# so the guest's i8042 probe ends quickly instead of timing out.
PS2_STATUS_PORT = 0x64
PS2_STATUS_VALUE = 1

# ---------------------------------------------------------------------------
# Refusal codes: a decoder returns length = -code.

E_TRUNCATED = 1
E_LOCK_REP = 2
E_PREFIX_REPEATED = 3
E_REX_POSITION = 4
E_OPCODE = 5
E_REGISTER_FORM = 6
E_CLI_PREFIX = 7

_MESSAGES = {
    E_TRUNCATED: "instruction runs past the bytes supplied (fetch up to 15 bytes; SDM Vol. 2A §2.3.11)",
    E_LOCK_REP: "lock/rep/repne prefix (F0/F2/F3) on a device access is not emulated (SDM Vol. 2A §2.1.1 group 1)",
    E_PREFIX_REPEATED: "a prefix from the same group appears twice (SDM Vol. 2A §2.1.1: behaviour is unpredictable)",
    E_REX_POSITION: "REX prefix not immediately before the opcode (SDM Vol. 2A §2.2.1: the CPU ignores it; not modelled)",
    E_OPCODE: "opcode is not a supported device access (in/out E4-E7 EC-EF, cli FA, mov 88-8B)",
    E_REGISTER_FORM: "mov with ModRM mod=11 is register-to-register and has no memory operand to emulate",
    E_CLI_PREFIX: "cli (FA) is only skipped without prefixes",
}


def error_message(code: int) -> str:
    """The rule behind refusal ``code`` (``-length`` of a refused decode)."""
    return _MESSAGES.get(abs(int(code)), f"unknown decode error {code}")


class Decoded(NamedTuple):
    """``(length, reg, width, is_write, port, high)``: see the module docstring."""
    length: int
    reg: int
    width: int
    is_write: int
    port: int
    high: int

    @property
    def ok(self) -> bool:
        return self.length > 0

    @property
    def error(self) -> int:
        """The ``E_*`` code of a refusal, 0 for a successful decode."""
        return -self.length if self.length <= 0 else 0


# ---------------------------------------------------------------------------
# Kernels


@njit(nogil=True, cache=True)
def _usable(buf, n):
    """How many bytes of ``buf`` a decoder may read: never past the array,
    never past the architectural limit."""
    if n > buf.size:
        n = buf.size
    if n > MAX_INSN_LEN:
        n = MAX_INSN_LEN
    if n < 0:
        n = 0
    return n


@njit(nogil=True, cache=True)
def _modrm_extra(buf, i, n, mode64, addr16):
    """Bytes after the ModRM byte at ``buf[i]`` (SIB + displacement), or -1
    when the SIB byte needed to tell lies beyond ``n``.  The ModRM byte must
    be a memory form (mod != 11)."""
    modrm = int(buf[i])
    mod = modrm >> 6
    rm = modrm & 7
    if addr16 and not mode64:
        # 16-bit addressing (SDM Vol. 2A Table 2-1): no SIB; r/m=110 with
        # mod=00 is a bare disp16.
        if mod == 1:
            return 1
        if mod == 2:
            return 2
        if rm == 6:
            return 2
        return 0
    # 32/64-bit addressing (Table 2-2, 2-3); REX.B/X never change the length.
    extra = 0
    if rm == 4:
        extra = 1
        if i + 1 >= n:
            return -1
        # SIB base=101 with mod=00: disp32 and no base register.
        if mod == 0 and (int(buf[i + 1]) & 7) == 5:
            return 5
    if mod == 1:
        return extra + 1
    if mod == 2:
        return extra + 4
    if rm == 5:
        return 4  # mod=00 r/m=101: disp32 (RIP-relative in 64-bit mode)
    return extra


@njit(nogil=True, cache=True)
def _decode_mmio(buf, n, mode64):
    """Decode a mov to/from memory at ``buf[0:n]``.

    Returns the six :class:`Decoded` fields ``(length, reg, width,
    is_write, -1, high)``; ``length = -E_*`` when refused.
    """
    n = _usable(buf, n)
    opsize16 = False
    addr16 = False
    seg = False
    rex = -1  # -1: none; else the low nibble WRXB
    i = 0
    while True:
        if i >= n:
            return -E_TRUNCATED, -1, 0, 0, -1, 0
        b = int(buf[i])
        if rex >= 0 and (b == 0x66 or b == 0x67 or b == 0xF0 or b == 0xF2 or b == 0xF3
                         or b == 0x26 or b == 0x2E or b == 0x36 or b == 0x3E
                         or b == 0x64 or b == 0x65 or (b & 0xF0) == 0x40):
            return -E_REX_POSITION, -1, 0, 0, -1, 0
        if b == 0x66:
            if opsize16:
                return -E_PREFIX_REPEATED, -1, 0, 0, -1, 0
            opsize16 = True
        elif b == 0x67:
            if addr16:
                return -E_PREFIX_REPEATED, -1, 0, 0, -1, 0
            addr16 = True
        elif b == 0x26 or b == 0x2E or b == 0x36 or b == 0x3E or b == 0x64 or b == 0x65:
            if seg:
                return -E_PREFIX_REPEATED, -1, 0, 0, -1, 0
            seg = True
        elif b == 0xF0 or b == 0xF2 or b == 0xF3:
            return -E_LOCK_REP, -1, 0, 0, -1, 0
        elif mode64 and (b & 0xF0) == 0x40:
            rex = b & 0xF
        else:
            break
        i += 1
    op = int(buf[i])
    if op < 0x88 or op > 0x8B:
        return -E_OPCODE, -1, 0, 0, -1, 0
    i += 1
    if i >= n:
        return -E_TRUNCATED, -1, 0, 0, -1, 0
    modrm = int(buf[i])
    if (modrm >> 6) == 3:
        return -E_REGISTER_FORM, -1, 0, 0, -1, 0
    extra = _modrm_extra(buf, i, n, mode64, addr16)
    if extra < 0:
        return -E_TRUNCATED, -1, 0, 0, -1, 0
    length = i + 1 + extra
    if length > n:
        return -E_TRUNCATED, -1, 0, 0, -1, 0
    reg = (modrm >> 3) & 7
    high = 0
    if rex >= 0 and (rex & 4):
        reg += 8
    if op == 0x88 or op == 0x8A:
        width = 1
        # Without REX, byte registers 4..7 are AH CH DH BH (SDM Vol. 2A §3.1.1.1).
        if rex < 0 and reg >= 4:
            reg -= 4
            high = 1
    elif rex >= 0 and (rex & 8):
        width = 8
    elif opsize16:
        width = 2
    else:
        width = 4
    is_write = 1 if op <= 0x89 else 0
    return length, reg, width, is_write, -1, high


@njit(nogil=True, cache=True)
def _decode_pio(buf, n):
    """Decode in/out/cli at ``buf[0:n]``.

    Returns the six :class:`Decoded` fields: reg 0 (eAX), port -1 for DX,
    high 0; ``cli`` is ``(1, -1, 0, 0, -1, 0)``; ``length = -E_*`` when
    refused.
    """
    n = _usable(buf, n)
    if n < 1:
        return -E_TRUNCATED, -1, 0, 0, -1, 0
    i = 0
    opsize16 = False
    b = int(buf[0])
    if b == 0xFA:
        return 1, -1, 0, 0, -1, 0
    if b == 0x66:
        opsize16 = True
        i = 1
        if n < 2:
            return -E_TRUNCATED, -1, 0, 0, -1, 0
        b = int(buf[1])
        if b == 0x66:
            return -E_PREFIX_REPEATED, -1, 0, 0, -1, 0
        if b == 0xFA:
            return -E_CLI_PREFIX, -1, 0, 0, -1, 0
    if b == 0xF0 or b == 0xF2 or b == 0xF3:
        return -E_LOCK_REP, -1, 0, 0, -1, 0
    if (b & 0xF4) != 0xE4:  # E4-E7 and EC-EF only
        return -E_OPCODE, -1, 0, 0, -1, 0
    if b & 1:
        width = 2 if opsize16 else 4
    else:
        width = 1
    is_write = 1 if b & 2 else 0
    if b & 8:
        return i + 1, 0, width, is_write, -1, 0
    if i + 2 > n:
        return -E_TRUNCATED, -1, 0, 0, -1, 0
    return i + 2, 0, width, is_write, int(buf[i + 1]), 0


@njit(nogil=True, cache=True)
def _decode_mmio_bulk(insns, lengths, mode64, out):
    """Decode every row of ``insns`` (N x k uint8, ``lengths[j]`` bytes valid)
    into ``out`` (N x D_COLUMNS int64)."""
    for j in range(insns.shape[0]):
        r = _decode_mmio(insns[j], lengths[j], mode64)
        for c in range(D_COLUMNS):
            out[j, c] = r[c]


@njit(nogil=True, cache=True)
def _decode_pio_bulk(insns, lengths, out):
    """Port-I/O counterpart of :func:`_decode_mmio_bulk`."""
    for j in range(insns.shape[0]):
        r = _decode_pio(insns[j], lengths[j])
        for c in range(D_COLUMNS):
            out[j, c] = r[c]


@njit(nogil=True, cache=True)
def _merge_register(old, value, width, high):
    """New register value after a ``width``-byte read of ``value`` into it.

    int64 two's complement in and out (a register is 64 raw bits)."""
    if width == 1:
        if high:
            return (old & ~0xFF00) | ((value & 0xFF) << 8)
        return (old & ~0xFF) | (value & 0xFF)
    if width == 2:
        return (old & ~0xFFFF) | (value & 0xFFFF)
    if width == 4:
        return value & 0xFFFFFFFF  # 32-bit writes zero-extend
    return value


@njit(nogil=True, cache=True)
def _register_operand(regval, width, high):
    """The ``width``-byte value a store/out takes from register value
    ``regval`` (int64 two's complement; the 8-byte result is too)."""
    if width == 1:
        if high:
            return (regval >> 8) & 0xFF
        return regval & 0xFF
    if width == 2:
        return regval & 0xFFFF
    if width == 4:
        return regval & 0xFFFFFFFF
    return regval


@njit(nogil=True, cache=True)
def _unclaimed_port_read(port, width):
    """What an ``in`` from a port no device claims returns: all ones
    ("nothing there"), except the PS/2 status port, which reads 1."""
    if port == PS2_STATUS_PORT:
        return PS2_STATUS_VALUE
    if width == 1:
        return 0xFF
    if width == 2:
        return 0xFFFF
    return 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Public wrappers

_U64 = (1 << 64) - 1
# Three times cheaper than Decoded(...), which re-parses its arguments; the
# kernels already return the six fields in order.
_new_tuple = tuple.__new__
_WIDTHS = (1, 2, 4, 8)


_UINT8 = np.dtype(np.uint8)


def _as_bytes_array(insn) -> np.ndarray:
    # The common case first: a backend's fetch window, checked cheaply.
    if type(insn) is np.ndarray and insn.dtype is _UINT8 and insn.ndim == 1:
        return insn
    if isinstance(insn, np.ndarray):
        if insn.dtype != np.uint8 or insn.ndim != 1:
            raise TypeError(f"instruction bytes must be a 1-D uint8 array, got {insn.dtype} with {insn.ndim} dims")
        return insn
    return np.frombuffer(insn, dtype=np.uint8)


def decode_mmio(insn, mode64: bool = False) -> Decoded:
    """Decode the MMIO ``mov`` at the start of ``insn`` (bytes-like or a 1-D
    uint8 array; only the first 15 bytes are looked at).  ``mode64`` selects
    64-bit code (REX prefixes, RIP-relative); default 32-bit protected mode."""
    buf = _as_bytes_array(insn)
    return _new_tuple(Decoded, _decode_mmio(buf, buf.size, bool(mode64)))


def decode_pio(insn) -> Decoded:
    """Decode the ``in``/``out``/``cli`` at the start of ``insn`` (bytes-like
    or a 1-D uint8 array)."""
    buf = _as_bytes_array(insn)
    return _new_tuple(Decoded, _decode_pio(buf, buf.size))


def _bulk_args(insns, lengths):
    insns = np.ascontiguousarray(insns, dtype=np.uint8)
    if insns.ndim != 2:
        raise ValueError(f"insns must be an (N, k) uint8 array, got shape {insns.shape}")
    if lengths is None:
        lengths = np.full(insns.shape[0], insns.shape[1], dtype=np.int64)
    else:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if lengths.shape != (insns.shape[0],):
            raise ValueError(f"lengths must have shape ({insns.shape[0]},), got {lengths.shape}")
    return insns, lengths, np.empty((insns.shape[0], D_COLUMNS), dtype=np.int64)


def decode_mmio_bulk(insns, lengths=None, mode64: bool = False) -> np.ndarray:
    """Decode each row of an (N, k) uint8 array in one call (row j has
    ``lengths[j]`` valid bytes, default k).  Returns an (N, 6) int64 array
    whose columns are the :class:`Decoded` fields (``D_*`` indices)."""
    insns, lengths, out = _bulk_args(insns, lengths)
    _decode_mmio_bulk(insns, lengths, bool(mode64), out)
    return out


def decode_pio_bulk(insns, lengths=None) -> np.ndarray:
    """Port-I/O counterpart of :func:`decode_mmio_bulk`."""
    insns, lengths, out = _bulk_args(insns, lengths)
    _decode_pio_bulk(insns, lengths, out)
    return out


def _check_reg_args(regval: int, width: int, high) -> None:
    if not 0 <= regval <= _U64:
        raise ValueError(f"register value must be 0..2**64-1, got {regval:#x}")
    if width not in _WIDTHS:
        raise ValueError(f"width must be 1, 2, 4 or 8, got {width}")
    if high and width != 1:
        raise ValueError("only 1-byte accesses can use a high-byte register")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def merge_register(old: int, value: int, width: int, high: bool = False) -> int:
    """Register value (0..2**64-1) after a ``width``-byte device read of
    ``value`` into a register holding ``old``: see "Register helpers" in the
    module docstring.  Bits of ``value`` above ``width`` are ignored."""
    _check_reg_args(old, width, high)
    value = int(value) & _U64
    return _merge_register(_signed64(old), _signed64(value), width, bool(high)) & _U64


def register_operand(regval: int, width: int, high: bool = False) -> int:
    """The ``width``-byte value (unsigned) a store or ``out`` takes from a
    register holding ``regval``; ``high`` selects AH/CH/DH/BH."""
    _check_reg_args(regval, width, high)
    return _register_operand(_signed64(regval), width, bool(high)) & _U64


def unclaimed_port_read(port: int, width: int) -> int:
    """Value an ``in`` from an unclaimed port reads (all ones; 1 from the PS/2
    status port 0x64, as lguest answers)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..0xffff, got {port:#x}")
    if width not in (1, 2, 4):
        raise ValueError(f"port I/O width must be 1, 2 or 4, got {width}")
    return int(_unclaimed_port_read(port, width))
