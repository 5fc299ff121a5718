"""x86 device-access decoders (lguest_jit.hw.decode) against capstone.

Capstone is the oracle: every encoding of the supported families is
enumerated (every ModRM and SIB byte, every displacement size, with and
without prefixes, in 32- and 64-bit mode) and must decode exactly as
capstone does -- length, register, width, direction, high byte.  Anything
else, random or hand-picked, must be refused or agree with capstone: never a
wrong decode.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

capstone = pytest.importorskip("capstone")
from hypothesis import given, settings, strategies as st  # noqa: E402

from lguest_jit.hw.decode import (  # noqa: E402
    D_HIGH, D_IS_WRITE, D_LENGTH, D_PORT, D_REG, D_WIDTH, E_CLI_PREFIX, E_LOCK_REP, E_OPCODE,
    E_PREFIX_REPEATED, E_REGISTER_FORM, E_REX_POSITION, E_TRUNCATED, MAX_INSN_LEN, Decoded,
    decode_mmio, decode_mmio_bulk, decode_pio, decode_pio_bulk, error_message, merge_register,
    register_operand, unclaimed_port_read)

PURE_PYTHON = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
SEGS = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
MOVS = (0x88, 0x89, 0x8A, 0x8B)
CS32 = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
CS64 = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

# ---------------------------------------------------------------------------
# The oracle: capstone's text, turned into our tuple.

_REGS = {}
for _num, _names in enumerate(zip(
        ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil"),
        ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di"),
        ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"),
        ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"))):
    for _w, _name in zip((1, 2, 4, 8), _names):
        _REGS[_name] = (_num, _w, 0)
for _num in range(8, 16):
    for _w, _suffix in ((1, "b"), (2, "w"), (4, "d"), (8, "")):
        _REGS[f"r{_num}{_suffix}"] = (_num, _w, 0)
for _num, _name in enumerate(("ah", "ch", "dh", "bh")):
    _REGS[_name] = (_num, 1, 1)
_PTR = {"byte": 1, "word": 2, "dword": 4, "qword": 8}


def _mmio_from_text(size, mnem, ops):
    if mnem != "mov":
        return None
    parts = ops.split(", ")
    if len(parts) != 2:
        return None
    mem_first = "[" in parts[0]
    mem, reg = (parts[0], parts[1]) if mem_first else (parts[1], parts[0])
    if "[" not in mem or "[" in reg or reg not in _REGS:
        return None
    num, rwidth, high = _REGS[reg]
    mwidth = _PTR[mem.split(" ptr ")[0]]
    assert mwidth == rwidth, ops
    return size, num, mwidth, int(mem_first), high


def capstone_mmio(md, code: bytes):
    """(length, reg, width, is_write, high) for a register<->memory mov, or
    None for anything else capstone sees (including nothing)."""
    for _addr, size, mnem, ops in md.disasm_lite(code, 0, 1):
        return _mmio_from_text(size, mnem, ops)
    return None


def capstone_pio(md, code: bytes):
    """(length, reg, width, is_write, port) for in/out, (1, -1, 0, 0, -1)
    for cli, None for anything else."""
    for _addr, size, mnem, ops in md.disasm_lite(code, 0, 1):
        if mnem == "cli":
            return size, -1, 0, 0, -1
        if mnem not in ("in", "out"):
            return None
        a, b = ops.split(", ")
        reg, port = (a, b) if mnem == "in" else (b, a)
        num, width, _high = _REGS[reg]
        assert num == 0
        return size, 0, width, int(mnem == "out"), -1 if port == "dx" else int(port, 0)
    return None


def check_against_capstone(rows: np.ndarray, lengths: np.ndarray, mode64: bool, require_ok: bool) -> int:
    """Decode ``rows`` in bulk; every accepted row must match capstone on
    exactly the bytes we were given.  ``require_ok``: every row must be
    accepted.  Returns how many rows were accepted."""
    md = CS64 if mode64 else CS32
    out = decode_mmio_bulk(rows, lengths, mode64=mode64)
    ok = out[:, D_LENGTH] > 0
    if require_ok:
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, [(bytes(rows[j, :lengths[j]]).hex(), error_message(out[j, 0])) for j in bad[:5]]
    assert np.all(out[:, D_PORT] == -1)
    idx = np.flatnonzero(ok)
    width = rows.shape[1]
    flat = rows[idx].tobytes()
    got_rows = [tuple(r) for r in out[idx][:, [D_LENGTH, D_REG, D_WIDTH, D_IS_WRITE, D_HIGH]].tolist()]
    # Fast path: capstone walks all accepted instructions, each cut to the
    # length *we* decoded, laid end to end, in one call.  Any length
    # disagreement shifts its instruction boundaries off ours, so the whole
    # walk must line up exactly.
    codes = [flat[k * width:k * width + got[0]] for k, got in enumerate(got_rows)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).tolist()
    walked = list(md.disasm_lite(b"".join(codes), 0))
    if len(walked) == len(codes) and all(
            a == off and _mmio_from_text(size, mnem, ops) == got
            for (a, size, mnem, ops), off, got in zip(walked, offsets, got_rows)):
        return int(ok.sum())
    # Slow path, to report what differs (on the bytes we were given).
    given = [flat[k * width:k * width + n] for k, n in enumerate(lengths[idx].tolist())]
    mism = [(c.hex(), got, capstone_mmio(md, c)) for c, got in zip(given, got_rows) if capstone_mmio(md, c) != got]
    assert not mism, mism[:5]
    return int(ok.sum())


# ---------------------------------------------------------------------------
# Exhaustive enumeration of the MMIO family

def enumerate_mmio(prefixes: tuple, full_sib: bool, rng, mod3: bool = True) -> np.ndarray:
    """(N, 15) candidates: prefixes + each of 88-8B + every ModRM byte (+ every
    SIB byte where a SIB follows, or 16 random ones unless ``full_sib``),
    then random displacement/trailing bytes."""
    rows = []
    k = len(prefixes)
    sibs_all = np.arange(256, dtype=np.uint8)
    for op in MOVS:
        modrms = np.arange(256 if mod3 else 192, dtype=np.int64)
        plain = modrms[~(((modrms & 7) == 4) & ((modrms >> 6) != 3))]
        block = rng.integers(0, 256, size=(plain.size, MAX_INSN_LEN), dtype=np.uint8)
        block[:, :k] = prefixes
        block[:, k] = op
        block[:, k + 1] = plain
        rows.append(block)
        for modrm in (m for m in range(192) if (m & 7) == 4):
            sibs = sibs_all if full_sib else rng.choice(sibs_all, 16, replace=False)
            block = rng.integers(0, 256, size=(sibs.size, MAX_INSN_LEN), dtype=np.uint8)
            block[:, :k] = prefixes
            block[:, k] = op
            block[:, k + 1] = modrm
            block[:, k + 2] = sibs
            rows.append(block)
    return np.concatenate(rows)


def _prefix_orders(*groups):
    """Every ordering of one pick from each group."""
    for picks in itertools.product(*groups):
        yield from itertools.permutations(picks)


# 32-bit protected mode: every SIB byte for these prefix sets ...
FULL32 = [(), (0x66,), (0x3E,), (0x64, 0x66), (0x66, 0x65), (0x67,), (0x66, 0x67)]
# ... and every ModRM (16 random SIBs) for every other combination of the
# operand-size, segment and address-size prefixes, in every order.
PARTIAL32 = sorted({p for n in (1, 2, 3) for groups in itertools.combinations(((0x66,), SEGS, (0x67,)), n)
                    for p in _prefix_orders(*groups)} - set(FULL32))
REX_ALL = tuple(range(0x40, 0x50))
FULL64 = [(), (0x66,), (0x48,), (0x4C,), (0x41,), (0x42,), (0x40,), (0x66, 0x44), (0x64, 0x48), (0x67, 0x4F)]
PARTIAL64 = sorted({(r,) for r in REX_ALL} | {(0x66, r) for r in REX_ALL} | {(s, r) for s in SEGS for r in (0x40, 0x4D)}
                   | {(0x67, 0x66, r) for r in (0x41, 0x4A)} | {(0x65,), (0x67,), (0x66, 0x67)} - set(FULL64))

if PURE_PYTHON:  # the same checks on fewer rows: plain Python is ~100x slower
    FULL32, PARTIAL32 = FULL32[:3], PARTIAL32[::8]
    FULL64, PARTIAL64 = FULL64[:3], PARTIAL64[::8]


@pytest.mark.parametrize("mode64", [False, True], ids=["32bit", "64bit"])
def test_mmio_exhaustive_matches_capstone(mode64):
    rng = np.random.default_rng(5)
    full, partial = (FULL64, PARTIAL64) if mode64 else (FULL32, PARTIAL32)
    for prefixes in full + partial:
        rows = enumerate_mmio(prefixes, prefixes in full, rng, mod3=False)
        lengths = np.full(rows.shape[0], MAX_INSN_LEN, dtype=np.int64)
        accepted = check_against_capstone(rows, lengths, mode64, require_ok=True)
        assert accepted == rows.shape[0]


@pytest.mark.parametrize("mode64", [False, True], ids=["32bit", "64bit"])
def test_mmio_every_length_and_truncation(mode64):
    """Every instruction length the family has, and each one cut one byte
    short is refused as truncated, never decoded shorter."""
    rng = np.random.default_rng(6)
    rows = np.concatenate([enumerate_mmio(p, False, rng, mod3=False)
                           for p in ([(), (0x66,), (0x67,), (0x48,), (0x67, 0x48)] if mode64 else [(), (0x67,), (0x66, 0x26)])])
    full = decode_mmio_bulk(rows, mode64=mode64)
    lengths = full[:, D_LENGTH]
    assert np.all(lengths > 0)
    # No SIB, disp8, disp16 (0x67 in 32-bit code), disp32, SIB+disp8, SIB+disp32 ...
    expected = {2, 3, 4, 6, 7} | ({5, 8, 9} if mode64 else {5, 8})
    assert expected <= set(np.unique(lengths).tolist())
    exact = decode_mmio_bulk(rows, lengths, mode64=mode64)
    assert np.array_equal(exact, full)
    short = decode_mmio_bulk(rows, lengths - 1, mode64=mode64)
    assert np.all(short[:, D_LENGTH] == -E_TRUNCATED)
    check_against_capstone(rows[::7], lengths[::7], mode64, require_ok=True)


def test_mmio_register_forms_refused():
    """mod=11 is a register-to-register mov: capstone decodes it, we must not."""
    for mode64, op, modrm in itertools.product((False, True), MOVS, range(0xC0, 0x100)):
        code = bytes([op, modrm])
        assert capstone_mmio(CS64 if mode64 else CS32, code) is None  # no memory operand
        assert decode_mmio(code, mode64=mode64).error == E_REGISTER_FORM


def test_high_byte_registers():
    # mov [eax], ah / mov bh, [ebx+4] / 66 prefix does not turn AH into something else
    assert decode_mmio(bytes.fromhex("8820")) == Decoded(2, 0, 1, 1, -1, 1)
    assert decode_mmio(bytes.fromhex("8a7b04")) == Decoded(3, 3, 1, 0, -1, 1)
    assert decode_mmio(bytes.fromhex("668a3b")) == Decoded(3, 3, 1, 0, -1, 1)
    # With any REX byte, 4..7 are SPL..DIL; with REX.R, r12b..r15b.
    assert decode_mmio(bytes.fromhex("408820"), mode64=True) == Decoded(3, 4, 1, 1, -1, 0)
    assert decode_mmio(bytes.fromhex("448a38"), mode64=True) == Decoded(3, 15, 1, 0, -1, 0)
    # In 32-bit code 0x40 is `inc eax`, not a prefix.
    assert decode_mmio(bytes.fromhex("408820")).error == E_OPCODE


def test_lguest_bugs_fixed():
    """The encodings lguest's emulate_mmio got wrong in 32-bit code."""
    # mod=00 r/m=101 is disp32, not disp16: mov eax, [0x12345678]
    assert decode_mmio(bytes.fromhex("8b0578563412")).length == 6
    # a SIB byte: mov [esp+8], ecx -- lguest said 3
    assert decode_mmio(bytes.fromhex("894c2408")).length == 4
    # SIB with no base: mov edx, [ecx*4+0x1000]
    assert decode_mmio(bytes.fromhex("8b148d00100000")) == Decoded(7, 2, 4, 0, -1, 0)
    # 0x66 before a byte mov (lguest looked at insn[0] for 88/8A)
    assert decode_mmio(bytes.fromhex("668801")) == Decoded(3, 0, 1, 1, -1, 0)


@pytest.mark.parametrize("code, err", [
    ("f08900", E_LOCK_REP), ("f38b00", E_LOCK_REP), ("f28800", E_LOCK_REP), ("66f08900", E_LOCK_REP),
    ("66668900", E_PREFIX_REPEATED), ("26648900", E_PREFIX_REPEATED), ("67678b00", E_PREFIX_REPEATED),
    ("c70001000000", E_OPCODE), ("a100100000", E_OPCODE), ("0fb600", E_OPCODE), ("8700", E_OPCODE),
    ("8d00", E_OPCODE), ("8c00", E_OPCODE), ("", E_TRUNCATED), ("66", E_TRUNCATED), ("89", E_TRUNCATED),
    ("8904", E_TRUNCATED), ("890425", E_TRUNCATED), ("8980000000", E_TRUNCATED),
])
def test_mmio_refusals_32(code, err):
    assert decode_mmio(bytes.fromhex(code)).error == err
    assert error_message(err) != error_message(0)


@pytest.mark.parametrize("code, err", [
    ("48648900", E_REX_POSITION), ("48668900", E_REX_POSITION), ("48488900", E_REX_POSITION),
    ("40f08900", E_REX_POSITION), ("f0488900", E_LOCK_REP), ("48c70001000000", E_OPCODE), ("48", E_TRUNCATED),
])
def test_mmio_refusals_64(code, err):
    assert decode_mmio(bytes.fromhex(code), mode64=True).error == err


# ---------------------------------------------------------------------------
# Port I/O

def test_pio_exhaustive_matches_capstone():
    rows = []
    for prefix, op, imm in itertools.product(((), (0x66,)), (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF), range(256)):
        rows.append((bytes(prefix) + bytes([op, imm])).ljust(MAX_INSN_LEN, b"\x90"))
    rows.append(b"\xfa".ljust(MAX_INSN_LEN, b"\x90"))
    arr = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 15)
    out = decode_pio_bulk(arr)
    assert np.all(out[:, D_LENGTH] > 0)
    assert np.all(out[:, D_HIGH] == 0)
    seen_ports = set()
    for md in (CS32, CS64):  # the family decodes the same in both modes
        for j, code in enumerate(rows):
            got = tuple(int(x) for x in out[j, [D_LENGTH, D_REG, D_WIDTH, D_IS_WRITE, D_PORT]])
            assert got == capstone_pio(md, code), code.hex()
            assert tuple(decode_pio(code)) == tuple(out[j])
            seen_ports.add(got[4])
    assert seen_ports == set(range(-1, 256))


def test_pio_examples():
    assert decode_pio(b"\xec") == Decoded(1, 0, 1, 0, -1, 0)        # in al, dx
    assert decode_pio(b"\x66\xed") == Decoded(2, 0, 2, 0, -1, 0)    # in ax, dx
    assert decode_pio(b"\xe7\x71") == Decoded(2, 0, 4, 1, 0x71, 0)  # out 0x71, eax
    assert decode_pio(b"\xfa\x00") == Decoded(1, -1, 0, 0, -1, 0)   # cli: skip
    assert decode_pio(np.array([0x66, 0xE6, 0xCF], dtype=np.uint8)) == Decoded(3, 0, 1, 1, 0xCF, 0)


@pytest.mark.parametrize("code, err", [
    ("66fa", E_CLI_PREFIX), ("6666ec", E_PREFIX_REPEATED), ("f3ec", E_LOCK_REP), ("66f3ec", E_LOCK_REP),
    ("6e", E_OPCODE), ("e8000000", E_OPCODE), ("fb", E_OPCODE), ("26ec", E_OPCODE), ("48ec", E_OPCODE),
    ("e4", E_TRUNCATED), ("66e6", E_TRUNCATED), ("66", E_TRUNCATED), ("", E_TRUNCATED),
])
def test_pio_refusals(code, err):
    assert decode_pio(bytes.fromhex(code)).error == err


def test_pio_never_misdecodes_any_two_byte_prefix():
    """Every 3-byte string starting with any byte pair: accepted ones match
    capstone in both modes."""
    a = np.array(list(itertools.product(range(256), range(256))), dtype=np.uint8)
    rows = np.concatenate([a, np.full((a.shape[0], 1), 0x42, dtype=np.uint8)], axis=1)
    out = decode_pio_bulk(rows)
    for j in np.flatnonzero(out[:, D_LENGTH] > 0):
        code = rows[j].tobytes()
        got = tuple(int(x) for x in out[j, [D_LENGTH, D_REG, D_WIDTH, D_IS_WRITE, D_PORT]])
        assert got == capstone_pio(CS32, code) == capstone_pio(CS64, code), code.hex()


# ---------------------------------------------------------------------------
# Random streams: refuse or agree, never a wrong decode

_NEAR = [0x66, 0x67, 0xF0, 0xF2, 0xF3, *SEGS, *REX_ALL, 0x0F, *MOVS, 0x86, 0x87, 0x8C, 0x8D, 0x8E,
         0xC6, 0xC7, 0xA0, 0xA1, 0xA2, 0xA3, *range(0xE4, 0xF0), 0xFA, 0x6C, 0x6D, 0x6E, 0x6F]


def random_streams(rng, n: int) -> np.ndarray:
    """Rows of up to four bytes from near the supported families, then noise."""
    rows = rng.integers(0, 256, size=(n, MAX_INSN_LEN), dtype=np.uint8)
    near = np.array(_NEAR, dtype=np.uint8)
    k = 4
    pick = rng.random((n, k)) < 0.8
    rows[:, :k] = np.where(pick, near[rng.integers(0, near.size, size=(n, k))], rows[:, :k])
    return rows


@pytest.mark.parametrize("mode64", [False, True], ids=["32bit", "64bit"])
def test_random_streams_never_misdecoded(mode64):
    rng = np.random.default_rng(7 + mode64)
    rows = random_streams(rng, 20_000 if PURE_PYTHON else 200_000)
    lengths = rng.integers(1, MAX_INSN_LEN + 1, size=rows.shape[0])
    accepted = check_against_capstone(rows, lengths, mode64, require_ok=False)
    assert accepted > 100  # the stream does reach the supported family
    md = CS64 if mode64 else CS32
    out = decode_pio_bulk(rows, lengths)
    for j in np.flatnonzero(out[:, D_LENGTH] > 0):
        code = rows[j, :lengths[j]].tobytes()
        assert tuple(int(x) for x in out[j, :5]) == capstone_pio(md, code), code.hex()


@settings(max_examples=300 if PURE_PYTHON else 1000, deadline=None)
@given(prefix=st.lists(st.sampled_from(_NEAR), max_size=4), tail=st.binary(max_size=12), mode64=st.booleans())
def test_hypothesis_streams(prefix, tail, mode64):
    code = bytes(prefix) + tail
    md = CS64 if mode64 else CS32
    m = decode_mmio(code, mode64=mode64)
    if m.ok:
        assert (m.length, m.reg, m.width, m.is_write, m.high) == capstone_mmio(md, code)
    else:
        assert error_message(m.error).split()[0] != "unknown"
    p = decode_pio(code)
    if p.ok:
        assert tuple(p)[:5] == capstone_pio(md, code)


# ---------------------------------------------------------------------------
# Register helpers

def test_merge_register():
    old = 0x1122334455667788
    assert merge_register(old, 0xAB, 1) == 0x11223344556677AB
    assert merge_register(old, 0xAB, 1, high=True) == 0x112233445566AB88
    assert merge_register(old, 0xFFFFABCD, 2) == 0x112233445566ABCD
    assert merge_register(old, 0xDEADBEEF, 4) == 0xDEADBEEF              # zero-extends
    assert merge_register(old, 0xFEDCBA9876543210, 8) == 0xFEDCBA9876543210
    assert merge_register(2**64 - 1, 0, 1, high=True) == 0xFFFFFFFFFFFF00FF
    assert merge_register(2**64 - 1, 0x12, 2) == 0xFFFFFFFFFFFF0012
    with pytest.raises(ValueError):
        merge_register(0, 1, 2, high=True)
    with pytest.raises(ValueError):
        merge_register(0, 1, 3)
    with pytest.raises(ValueError):
        merge_register(-1, 1, 4)


def test_register_operand():
    r = 0xFEDCBA9876543210
    assert register_operand(r, 1) == 0x10
    assert register_operand(r, 1, high=True) == 0x32
    assert register_operand(r, 2) == 0x3210
    assert register_operand(r, 4) == 0x76543210
    assert register_operand(r, 8) == r


@settings(max_examples=500, deadline=None)
@given(old=st.integers(0, 2**64 - 1), value=st.integers(0, 2**64 - 1), width=st.sampled_from([1, 2, 4, 8]),
       high=st.booleans())
def test_merge_then_extract_roundtrip(old, value, width, high):
    high = high and width == 1
    mask = (1 << (8 * width)) - 1
    new = merge_register(old, value, width, high)
    assert register_operand(new, width, high) == value & mask
    if width <= 2:  # narrow reads keep every other bit
        keep = ~(mask << (8 if high else 0)) & (2**64 - 1)
        assert new & keep == old & keep
    else:
        assert new == value & mask


def test_unclaimed_port_read():
    assert unclaimed_port_read(0x64, 1) == 1      # PS/2 status: ready
    assert unclaimed_port_read(0x60, 1) == 0xFF
    assert unclaimed_port_read(0x1F0, 2) == 0xFFFF
    assert unclaimed_port_read(0xCFC, 4) == 0xFFFFFFFF
    with pytest.raises(ValueError):
        unclaimed_port_read(0x10000, 1)


def test_wrapper_input_validation():
    with pytest.raises(TypeError):
        decode_mmio(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        decode_mmio_bulk(np.zeros(15, dtype=np.uint8))
    with pytest.raises(ValueError):
        decode_pio_bulk(np.zeros((2, 15), dtype=np.uint8), lengths=[1])
    # Only the first 15 bytes count: a long fetch window is fine.
    assert decode_mmio(bytes.fromhex("8b00") + bytes(100)).length == 2


# ---------------------------------------------------------------------------
# The pure-Python baseline decodes identically

@pytest.mark.skipif(PURE_PYTHON, reason="already running without the JIT")
def test_pure_python_kernels_agree():
    rng = np.random.default_rng(11)
    rows = np.concatenate([random_streams(rng, 1500), enumerate_mmio((0x66,), False, rng)[::3],
                           enumerate_mmio((0x48,), False, rng)[::3]])
    lengths = rng.integers(0, MAX_INSN_LEN + 1, size=rows.shape[0])
    code = ("import json, sys, numpy as np; from lguest_jit.hw import decode as d; "
            "rows = np.array(json.loads(sys.stdin.readline()), dtype=np.uint8); "
            "lens = np.array(json.loads(sys.stdin.readline())); "
            "print(json.dumps([d.decode_mmio_bulk(rows, lens).tolist(), d.decode_mmio_bulk(rows, lens, True).tolist(),"
            " d.decode_pio_bulk(rows, lens).tolist()]))")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(rows.tolist()) + "\n" + json.dumps(lengths.tolist()) + "\n",
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    py32, py64, pypio = (np.array(x) for x in json.loads(res.stdout))
    assert np.array_equal(py32, decode_mmio_bulk(rows, lengths))
    assert np.array_equal(py64, decode_mmio_bulk(rows, lengths, mode64=True))
    assert np.array_equal(pypio, decode_pio_bulk(rows, lengths))
    assert (py32[:, 0] > 0).sum() > 100 and (py64[:, 0] > 0).sum() > 100
