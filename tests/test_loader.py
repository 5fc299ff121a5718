"""Kernel loading: every image kind built synthetically, checked byte for byte
in guest memory, and every bad image refused with a one-line LoadError."""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import os
import struct

import numpy as np
import pytest

from lguest_jit.hw.loader import (BOOT_PARAMS_ADDR, CMDLINE_ADDR, GDT_ADDR, BootInfo, LoadError,
                                  decompress_payload, identity_map_size, load_initrd, load_linux,
                                  lz4_legacy_decompress)
from lguest_jit.hw.memory import GuestMemory

from naive import page_walk as translate

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------
# Image builders (straight from the ELF and x86 boot-protocol layouts)


def make_elf(bits=64, machine=None, entry=0x100000, segments=None, cls=None, etype=2, endian=1,
             extra_phdrs=()):
    """An ELF executable.  segments: [(paddr, vaddr, data, memsz)]; data is
    placed page-aligned after the program headers."""
    machine = (62 if bits == 64 else 3) if machine is None else machine
    cls = (2 if bits == 64 else 1) if cls is None else cls
    if segments is None:
        segments = [(0x100000, 0xffffffff81000000 if bits == 64 else 0xc0100000, b"\x90" * 64, 256)]
    ehsize, phsize = (64, 56) if bits == 64 else (52, 32)
    phdrs = [(1, paddr, vaddr, data, memsz) for paddr, vaddr, data, memsz in segments] + list(extra_phdrs)
    offset = -(-(ehsize + phsize * len(phdrs)) // 0x1000) * 0x1000
    body = bytearray()
    ph_bytes = b""
    for p_type, paddr, vaddr, data, memsz in phdrs:
        off = offset + len(body)
        if bits == 64:
            ph_bytes += struct.pack("<IIQQQQQQ", p_type, 7, off, vaddr, paddr, len(data), memsz, 0x1000)
        else:
            ph_bytes += struct.pack("<IIIIIIII", p_type, off, vaddr, paddr, len(data), memsz, 7, 0x1000)
        body += data
        body += bytes(-len(body) % 0x1000)
    ident = b"\x7fELF" + bytes([cls, endian, 1]) + bytes(9)
    if bits == 64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, ehsize, 0, 0, ehsize, phsize,
                                   len(phdrs), 64, 0, 0)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, ehsize, 0, 0, ehsize, phsize,
                                   len(phdrs), 40, 0, 0)
    head = ehdr + ph_bytes
    return head + bytes(offset - len(head)) + bytes(body)


def make_bzimage(pm_code=b"\xfa\xf4" * 300, version=0x020F, setup_sects=4, code32_start=0x100000,
                 payload=None, init_size=None, pref_address=0x1000000, cmdline_size=2047,
                 initrd_addr_max=0x7FFFFFFF, loadflags=0x01, syssize=None, boot_flag=0xAA55,
                 magic=b"HdrS", header_end=0x268):
    """A bzImage: boot sector + setup sectors holding the setup header, then
    the protected-mode code.  ``payload`` = (offset in pm_code, length)."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, -(-len(pm_code) // 16) if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, code32_start)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    if payload:
        struct.pack_into("<II", setup, 0x248, *payload)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, len(pm_code) if init_size is None else init_size)
    pm = bytes(pm_code) + bytes(-len(pm_code) % 16)
    return bytes(setup) + pm


def lz4_block_compress(src: bytes) -> bytes:
    """A small greedy LZ4 block compressor (hash of 4-byte prefixes), enough
    to produce literals, matches and overlapping matches."""
    out = bytearray()

    def length_ext(n):
        while n >= 255:
            out.append(255)
            n -= 255
        out.append(n)

    def emit(lit, offset=None, mlen=0):
        token = min(len(lit), 15) << 4 | (min(mlen - 4, 15) if offset else 0)
        out.append(token)
        if len(lit) >= 15:
            length_ext(len(lit) - 15)
        out.extend(lit)
        if offset:
            out.extend(struct.pack("<H", offset))
            if mlen - 4 >= 15:
                length_ext(mlen - 4 - 15)

    n, i, anchor, table = len(src), 0, 0, {}
    while i + 12 <= n:
        key = src[i:i + 4]
        cand = table.get(key)
        table[key] = i
        if cand is not None and i - cand <= 0xFFFF:
            m = 4
            while i + m < n - 5 and src[cand + m] == src[i + m]:
                m += 1
            emit(src[anchor:i], i - cand, m)
            i += m
            anchor = i
        else:
            i += 1
    emit(src[anchor:])
    return bytes(out)


def lz4_legacy(data: bytes, block=8 << 20) -> bytes:
    out = bytearray(struct.pack("<I", 0x184C2102))
    for i in range(0, len(data), block):
        blk = lz4_block_compress(data[i:i + block])
        out += struct.pack("<I", len(blk)) + blk
    return bytes(out)


def kernel_payload(codec: str, data: bytes) -> bytes:
    """Compressed payload as the kernel build makes it: stream + le32 size."""
    if codec == "gzip":
        z = gzip.compress(data)
    elif codec == "bzip2":
        z = bz2.compress(data)
    elif codec == "xz":
        z = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                          filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}])
    elif codec == "lzma":
        z = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif codec == "lz4":
        z = lz4_legacy(data)
    else:
        raise ValueError(codec)
    return z + struct.pack("<I", len(data))


def bzimage_with_payload(payload: bytes, **kw) -> bytes:
    stub = b"\xfa\xf4" * 64       # the decompressor's code before input_data
    pm = stub + payload + b"\xcc" * 32
    return make_bzimage(pm, payload=(len(stub), len(payload)), **kw)


# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture
def gm():
    g = GuestMemory(32 * MiB)
    yield g
    g.close()


def write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def u16(gm, a):
    return int.from_bytes(gm.read(a, 2), "little")


def u32(gm, a):
    return int.from_bytes(gm.read(a, 4), "little")


def u64(gm, a):
    return int.from_bytes(gm.read(a, 8), "little")


def check_boot_params(gm, info: BootInfo, cmdline: str):
    bp = BOOT_PARAMS_ADDR
    assert info.boot_params == bp
    assert gm.read(bp + 0x202, 4) == b"HdrS"
    assert u16(gm, bp + 0x1FE) == 0xAA55
    assert gm.mem[bp + 0x210] == 0xFF                     # type_of_loader
    assert gm.mem[bp + 0x211] & 1                         # LOADED_HIGH
    assert u16(gm, bp + 0x1FA) == 0xFFFF                  # vid_mode
    assert u32(gm, bp + 0x228) == CMDLINE_ADDR == info.cmdline_addr
    raw = cmdline.encode()
    assert gm.read(CMDLINE_ADDR, len(raw) + 1) == raw + b"\0"
    assert info.cmdline_size == len(raw)
    assert u32(gm, bp + 0x218) == info.initrd_addr
    assert u32(gm, bp + 0x21C) == info.initrd_size
    assert gm.mem[bp + 0x1E8] == 3
    table = [struct.unpack_from("<QQI", gm.read(bp + 0x2D0 + 20 * i, 20)) for i in range(3)]
    assert table == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (0x100000, gm.size - 0x100000, 1)]
    assert gm.mem[bp + 0x2D0 + 60:bp + 0x2D0 + 80].sum() == 0   # nothing after the third entry


def check_gdt(gm, info: BootInfo):
    assert info.gdt_base == GDT_ADDR and info.gdt_limit == 31
    gdt = struct.unpack("<4Q", gm.read(GDT_ADDR, 32))
    assert gdt[0] == gdt[1] == 0
    assert info.code_selector == 0x10 and info.data_selector == 0x18
    if info.mode == "long":
        assert gdt[2] == 0x00AF9B000000FFFF             # 64-bit code, L=1
    else:
        assert gdt[2] == 0x00CF9B000000FFFF             # flat 32-bit code
    assert gdt[3] == 0x00CF93000000FFFF                 # flat data


def check_long_mode(gm, info: BootInfo):
    assert info.mode == "long"
    assert info.cr0 & 0x80000001 == 0x80000001 and info.cr4 & 0x20 and info.efer == 0x500
    assert info.code.l == 1 and info.code.db == 0
    mapped = identity_map_size(gm.size)
    for va in (0, 0x7000, 0x100000 + 0x123, info.entry, gm.size - 1, mapped - 1):
        assert translate(gm.mem, info.cr3, va) == va
    assert translate(gm.mem, info.cr3, mapped) is None
    assert translate(gm.mem, info.cr3, 1 << 39) is None   # only PML4[0] exists


def one_line(err, path):
    msg = str(err.value)
    assert "\n" not in msg and msg
    assert str(path) in msg
    return msg


# ---------------------------------------------------------------------------
# ELF vmlinux


def test_elf_builder_agrees_with_pyelftools(tmp_path):
    from elftools.elf.elffile import ELFFile
    data = make_elf(64, entry=0x1000000, segments=[(0x1000000, 0xffffffff81000000, b"abc", 0x2000),
                                                    (0x1200000, 0xffffffff81200000, b"xyz" * 7, 21)])
    elf = ELFFile(io.BytesIO(data))
    assert elf.header.e_machine == "EM_X86_64" and elf.elfclass == 64
    segs = [(s["p_paddr"], s["p_filesz"], s["p_memsz"], s.data()) for s in elf.iter_segments()]
    assert segs == [(0x1000000, 3, 0x2000, b"abc"), (0x1200000, 21, 21, b"xyz" * 7)]


def test_elf64_loads_segments_zeroes_bss_and_enters_long_mode(gm, tmp_path):
    text = bytes(range(256)) * 20
    data = b"DATA" * 100
    kernel = make_elf(64, entry=0x1000000 + 0x10, segments=[
        (0x1000000, 0xffffffff81000000, text, len(text)),
        (0x1400000, 0xffffffff81400000, data, len(data) + 0x3000)])
    path = write(tmp_path, "vmlinux", kernel)
    # Dirty the bss first: the loader must zero it, not rely on fresh memory.
    gm.mem[0x1400000:0x1500000] = 0xAA
    info = load_linux(gm, path, "console=ttyS0 root=/dev/vda")
    assert info.kind == "elf64" and info.entry == 0x1000010
    assert gm.read(0x1000000, len(text)) == text
    assert gm.read(0x1400000, len(data)) == data
    assert not gm.mem[0x1400000 + len(data):0x1400000 + len(data) + 0x3000].any()
    assert gm.mem[0x1400000 + len(data) + 0x3000] == 0xAA    # exactly memsz, no more
    assert (info.kernel_start, info.kernel_end) == (0x1000000, 0x1400000 + len(data) + 0x3000)
    check_boot_params(gm, info, "console=ttyS0 root=/dev/vda")
    assert u16(gm, BOOT_PARAMS_ADDR + 0x206) == info.protocol >= 0x0206
    assert u32(gm, BOOT_PARAMS_ADDR + 0x238) == 2047
    check_gdt(gm, info)
    check_long_mode(gm, info)


def test_elf64_virtual_entry_is_translated(gm, tmp_path):
    kernel = make_elf(64, entry=0xffffffff81000020,
                      segments=[(0x100000, 0xffffffff81000000, b"\x90" * 64, 64)])
    info = load_linux(gm, write(tmp_path, "vmlinux", kernel))
    assert info.entry == 0x100020


def test_elf64_ignores_non_load_segments(gm, tmp_path):
    note = (4, 0, 0, b"NOTE" * 4, 16)                  # PT_NOTE at paddr 0: not loaded
    kernel = make_elf(64, extra_phdrs=[note])
    info = load_linux(gm, write(tmp_path, "vmlinux", kernel))
    assert info.kind == "elf64"
    assert gm.read(0, 4) == b"\0\0\0\0"


def test_page_tables_cover_ram_and_the_mmio_window(tmp_path):
    path = write(tmp_path, "vmlinux", make_elf(64))
    for size, mapped in ((64 << 20, 4 * GiB), (3 * GiB // 2, 4 * GiB), (5 * GiB, 4 * GiB)):
        big = GuestMemory(size)
        try:
            info = load_linux(big, path)
            assert identity_map_size(size) == mapped
            for va in (0, GiB + 12345, 0xE0000000 + 0x14, mapped - 4096):   # RAM and the PCI BARs
                assert translate(big.mem, info.cr3, va) == va
            assert translate(big.mem, info.cr3, mapped) is None
            e820_top = struct.unpack_from("<QQI", big.read(BOOT_PARAMS_ADDR + 0x2D0 + 40, 20))
            assert e820_top == (0x100000, size - 0x100000, 1)
        finally:
            big.close()


def test_elf32_enters_protected_mode(gm, tmp_path):
    code = b"\xfa\xbc\x00\x00\x20\x00" * 50
    kernel = make_elf(32, entry=0x100000, segments=[(0x100000, 0xc0100000, code, len(code) + 100)])
    info = load_linux(gm, write(tmp_path, "vmlinux32", kernel), "ro")
    assert info.kind == "elf32" and info.mode == "protected"
    assert info.entry == 0x100000 and info.cr3 is None
    assert info.cr0 & 1 and not info.cr0 & 0x80000000 and info.efer == 0
    assert info.code.db == 1 and info.code.l == 0 and info.code.limit == 0xFFFFFFFF
    assert gm.read(0x100000, len(code)) == code
    assert not gm.mem[0x100000 + len(code):0x100000 + len(code) + 100].any()
    check_boot_params(gm, info, "ro")
    check_gdt(gm, info)


# ---------------------------------------------------------------------------
# bzImage


def test_bzimage_32bit_entry(gm, tmp_path):
    pm = bytes(range(256)) * 9
    image = make_bzimage(pm, init_size=4 * MiB)
    path = write(tmp_path, "bzImage", image)
    info = load_linux(gm, path, "console=hvc0", prefer_elf_payload=False)
    assert info.kind == "bzimage" and info.mode == "protected" and info.entry == 0x100000
    assert gm.read(0x100000, len(pm)) == pm
    # The image's setup header is what the kernel sees, with our fields on top.
    bp = BOOT_PARAMS_ADDR
    assert gm.read(bp + 0x1F1, 0x1FA - 0x1F1) == image[0x1F1:0x1FA]   # vid_mode at 0x1fa is ours
    assert gm.read(bp + 0x1FC, 0x210 - 0x1FC) == image[0x1FC:0x210]
    assert gm.read(bp + 0x212, 0x218 - 0x212) == image[0x212:0x218]
    assert gm.read(bp + 0x22C, 0x268 - 0x22C) == image[0x22C:0x268]
    assert gm.mem[bp + 0x268:bp + 0x290].sum() == 0      # past the header's end: ours (zero)
    assert info.protocol == 0x020F
    check_boot_params(gm, info, "console=hvc0")
    check_gdt(gm, info)
    # init_size from pref_address (16 MiB) bounds where an initrd may go.
    assert info.kernel_end == 0x1000000 + 4 * MiB


def test_bzimage_setup_sects_zero_means_four(gm, tmp_path):
    pm = b"PMCODE" * 100
    image = make_bzimage(pm, setup_sects=0)
    assert len(image) - len(pm) - (-len(pm) % 16) == 5 * 512
    info = load_linux(gm, write(tmp_path, "bzImage", image), prefer_elf_payload=False)
    assert gm.read(info.entry, len(pm)) == pm


def test_bzimage_header_length_from_jump_byte(gm, tmp_path):
    # A 2.02 header ends at 0x22c: bytes after it must not be copied.
    image = bytearray(make_bzimage(version=0x0202, header_end=0x22C))
    image[0x22C:0x240] = b"\x77" * 20
    info = load_linux(gm, write(tmp_path, "bzImage", bytes(image)), "x" * 255)
    assert info.kind == "bzimage" and info.protocol == 0x0202
    assert gm.read(BOOT_PARAMS_ADDR + 0x22C, 20) == bytes(20)
    assert "no payload" in info.payload


PAYLOAD_ELF = make_elf(64, entry=0x1000000, segments=[
    (0x1000000, 0xffffffff81000000, (b"startup_64" + bytes(range(256))) * 300, 0x20000),
    (0x1100000, 0xffffffff81100000, b"\x00\x01" * 5000 + b"tail", 0x8000)])


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz", "lzma", "lz4"])
def test_bzimage_payload_elf(gm, tmp_path, codec):
    image = bzimage_with_payload(kernel_payload(codec, PAYLOAD_ELF), init_size=8 * MiB)
    info = load_linux(gm, write(tmp_path, "bzImage", image), "quiet", prefer_elf_payload=True)
    assert info.kind == "bzimage-payload-elf" and info.payload == codec
    assert info.entry == 0x1000000
    seg0 = (b"startup_64" + bytes(range(256))) * 300
    assert gm.read(0x1000000, len(seg0)) == seg0
    assert not gm.mem[0x1000000 + len(seg0):0x1020000].any()
    seg1 = b"\x00\x01" * 5000 + b"tail"
    assert gm.read(0x1100000, len(seg1)) == seg1
    # The bzImage's header, not a synthetic one, goes to the kernel.
    assert gm.read(BOOT_PARAMS_ADDR + 0x1FC, 0x210 - 0x1FC) == image[0x1FC:0x210]
    assert u32(gm, BOOT_PARAMS_ADDR + 0x260) == 8 * MiB
    # The 32-bit code was not loaded at code32_start.
    assert not gm.mem[0x100000:0x100100].any()
    check_boot_params(gm, info, "quiet")
    check_gdt(gm, info)
    check_long_mode(gm, info)


def test_bzimage_payload_unavailable_codec_falls_back_to_32bit_entry(gm, tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard installed: zstd payloads are decoded")
    except ImportError:
        pass
    payload = b"\x28\xb5\x2f\xfd" + bytes(100)
    image = bzimage_with_payload(payload)
    info = load_linux(gm, write(tmp_path, "bzImage", image))
    assert info.kind == "bzimage" and info.mode == "protected" and info.entry == 0x100000
    assert "zstd" in info.payload and "not available" in info.payload
    assert gm.read(0x100000, 128) == b"\xfa\xf4" * 64


@pytest.mark.parametrize("payload, why", [
    (gzip.compress(b"not an elf at all" * 10), "not an ELF"),
    (gzip.compress(PAYLOAD_ELF)[:200], "truncated"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 60, "gzip"),
    (b"\x89LZO" + bytes(20), "lzo"),
    (b"\x02\x21\x4c\x18" + struct.pack("<I", 5) + b"\xf0\x00\x00\x00\x00", "LZ4"),
    (b"PLAIN" * 20, "unknown compression"),
])
def test_bzimage_bad_payload_falls_back(gm, tmp_path, payload, why):
    info = load_linux(gm, write(tmp_path, "bzImage", bzimage_with_payload(payload)))
    assert info.kind == "bzimage" and info.mode == "protected"
    assert why in info.payload


def test_bzimage_payload_elf_outside_ram_is_an_error(tmp_path):
    small = GuestMemory(4 * MiB)
    try:
        path = write(tmp_path, "bzImage", bzimage_with_payload(kernel_payload("gzip", PAYLOAD_ELF), init_size=0))
        with pytest.raises(LoadError) as err:
            load_linux(small, path)
        msg = one_line(err, path)
        assert "payload" in msg and "outside guest RAM" in msg
    finally:
        small.close()


# ---------------------------------------------------------------------------
# LZ4 legacy frames


@pytest.mark.parametrize("data", [
    b"",
    b"a",
    b"abcdefgh" * 3,
    b"a" * 1000,                                        # overlapping matches, offset 1
    bytes(range(256)) * 40 + b"xyz" * 1000 + os.urandom(3000),
    (b"kernel " * 50 + os.urandom(7)) * 40,
])
@pytest.mark.parametrize("compiled", [True, False])
def test_lz4_legacy_round_trip(data, compiled):
    frame = lz4_legacy(data, block=4096) + struct.pack("<I", len(data))
    if not data:
        with pytest.raises(ValueError):
            lz4_legacy_decompress(frame, 1 << 20, compiled=compiled)
    else:
        assert lz4_legacy_decompress(frame, 1 << 20, compiled=compiled) == data


def test_lz4_against_reference_library_when_installed():
    lz4_block = pytest.importorskip("lz4.block")
    data = (b"vmlinux " * 300 + os.urandom(64)) * 50
    blk = lz4_block.compress(data, store_size=False)
    frame = struct.pack("<II", 0x184C2102, len(blk)) + blk + struct.pack("<I", len(data))
    assert lz4_legacy_decompress(frame, 1 << 20, compiled=True) == data
    assert lz4_legacy_decompress(frame, 1 << 20, compiled=False) == data
    # and our test compressor produces blocks the library accepts
    assert lz4_block.decompress(lz4_block_compress(data), uncompressed_size=len(data)) == data


@pytest.mark.parametrize("bad", [
    lz4_legacy(b"abcd" * 100) + struct.pack("<I", 401),            # size trailer disagrees
    struct.pack("<II", 0x184C2102, 3) + b"\x50ab",                 # literals run off the end
    struct.pack("<II", 0x184C2102, 4) + b"\x11a\x05\x00",          # match offset before the block
    struct.pack("<II", 0x184C2102, 3) + b"\x10a\x00",              # truncated offset
    struct.pack("<II", 0x184C2102, 4) + b"\x10a\x00\x00",          # offset 0
])
@pytest.mark.parametrize("compiled", [True, False])
def test_lz4_corrupt_blocks_are_rejected(bad, compiled):
    with pytest.raises(ValueError):
        lz4_legacy_decompress(bad, 1 << 20, compiled=compiled)


@pytest.mark.parametrize("compiled", [True, False])
def test_lz4_block_output_is_bounded(compiled):
    # One block claiming more than the format's 8 MiB: a long run of zeros.
    run = 9 << 20
    block = bytes([0x1F, 0]) + bytes([1, 0]) + b"\xff" * ((run - 19) // 255) + bytes([(run - 19) % 255]) + b"\x00"
    frame = struct.pack("<II", 0x184C2102, len(block)) + block
    with pytest.raises(ValueError, match="8 MiB"):
        lz4_legacy_decompress(frame, 1 << 30, compiled=compiled)


def test_decompress_payload_limit():
    with pytest.raises(ValueError, match="exceeds"):
        decompress_payload(gzip.compress(bytes(100000)), 50000)
    with pytest.raises(ValueError, match="exceeds"):
        decompress_payload(lz4_legacy(bytes(100000), block=10000), 50000)
    assert decompress_payload(gzip.compress(b"x" * 10) + b"trailer", 100) == ("gzip", b"x" * 10)


# ---------------------------------------------------------------------------
# initrd


def test_initrd_at_page_aligned_top_of_ram(gm, tmp_path):
    rd = os.urandom(3 * 4096 + 123)
    kpath = write(tmp_path, "vmlinux", make_elf(64))
    info = load_linux(gm, kpath, "rdinit=/init", initrd_path=write(tmp_path, "initrd", rd))
    assert info.initrd_size == len(rd)
    assert info.initrd_addr % 4096 == 0
    assert info.initrd_addr + len(rd) <= gm.size < info.initrd_addr + len(rd) + 4096
    assert gm.read(info.initrd_addr, len(rd)) == rd
    check_boot_params(gm, info, "rdinit=/init")


def test_initrd_respects_initrd_addr_max(gm, tmp_path):
    rd = b"R" * 5000
    image = make_bzimage(initrd_addr_max=16 * MiB - 1, init_size=0x1000, pref_address=0)
    info = load_linux(gm, write(tmp_path, "bzImage", image), initrd_path=write(tmp_path, "rd", rd),
                      prefer_elf_payload=False)
    assert info.initrd_addr == (16 * MiB - len(rd)) & ~4095
    assert gm.read(info.initrd_addr, len(rd)) == rd


def test_load_initrd_standalone(gm, tmp_path):
    rd = b"cpio" * 1000
    addr, size = load_initrd(gm, write(tmp_path, "rd", rd))
    assert (addr, size) == ((gm.size - len(rd)) & ~4095, len(rd))
    assert gm.read(addr, size) == rd
    with pytest.raises(LoadError) as err:
        load_initrd(gm, write(tmp_path, "big", bytes(31 * MiB + 4096)))
    assert "too little memory" in one_line(err, tmp_path / "big")


def test_initrd_overlapping_kernel_is_refused_and_memory_untouched(gm, tmp_path):
    kernel = make_elf(64, segments=[(0x100000, 0xffffffff81000000, b"K" * 100, 20 * MiB)])
    kpath = write(tmp_path, "vmlinux", kernel)
    rpath = write(tmp_path, "initrd", b"I" * (12 * MiB))
    with pytest.raises(LoadError) as err:
        load_linux(gm, kpath, initrd_path=rpath)
    msg = one_line(err, rpath)
    assert "too little memory" in msg
    assert not gm.mem.any()                               # validated before writing


def test_initrd_bigger_than_ram(gm, tmp_path):
    rpath = write(tmp_path, "initrd", bytes(33 * MiB))
    with pytest.raises(LoadError) as err:
        load_linux(gm, write(tmp_path, "vmlinux", make_elf(64)), initrd_path=rpath)
    assert "too little memory" in one_line(err, rpath)


# ---------------------------------------------------------------------------
# Bad images: one clear line each


def seg(paddr, data=b"\x90" * 16, memsz=None):
    return [(paddr, paddr, data, len(data) if memsz is None else memsz)]


BAD_IMAGES = {
    "random bytes": (os.urandom(4096).replace(b"\x7fELF", b"xxxx"), "neither an ELF vmlinux nor a bzImage"),
    "short file": (b"hi", "neither an ELF vmlinux nor a bzImage"),
    "wrong machine": (make_elf(64, machine=183), "not x86"),
    "elf32 with EM_X86_64": (make_elf(32, machine=62), "class mismatch"),
    "elf64 with EM_386": (make_elf(64, machine=3), "class mismatch"),
    "bad class": (make_elf(64, cls=3), "ELF class 3"),
    "big endian": (make_elf(64, endian=2), "little-endian"),
    "not executable": (make_elf(64, etype=3), "ET_EXEC"),
    "truncated segment": (make_elf(64)[:0x1000 + 10], "truncated"),
    "truncated header": (make_elf(64)[:40], "truncated ELF header"),
    "truncated phdrs": (make_elf(64)[:64 + 20], "truncated"),
    "segment outside RAM": (make_elf(64, entry=31 * MiB, segments=seg(31 * MiB, memsz=2 * MiB)),
                            "outside guest RAM"),
    "segment at 2^64-ish": (make_elf(64, entry=0xFFFFFFFFFFFFF000, segments=seg(0xFFFFFFFFFFFFF000)),
                            "outside guest RAM"),
    "segment below 1 MiB": (make_elf(64, entry=0x8000, segments=seg(0x8000)), "below 1 MiB"),
    "filesz > memsz": (make_elf(64, segments=seg(0x100000, memsz=8)), "p_filesz"),
    "entry outside segments": (make_elf(64, entry=0x300000), "entry point"),
    "no PT_LOAD": (make_elf(64, segments=[], extra_phdrs=[(4, 0, 0, b"n", 1)]), "no loadable"),
    "bzImage bad HdrS": (make_bzimage(magic=b"HdrX"), "bad magic"),
    "bzImage bad boot flag": (make_bzimage(boot_flag=0x1234), "bad magic"),
    "bzImage protocol 2.01": (make_bzimage(version=0x0201), "too old"),
    "zImage": (make_bzimage(loadflags=0), "zImage"),
    "bzImage truncated in setup": (make_bzimage()[:0x400], "truncated"),
    "bzImage truncated header": (make_bzimage()[:0x210], "truncated"),
    "bzImage truncated code": (make_bzimage(syssize=1000), "truncated"),
    "bzImage payload beyond code": (make_bzimage(payload=(16, 1 << 20)), "truncated"),
    "bzImage needs more RAM": (make_bzimage(init_size=64 * MiB), "too little memory"),
    "bzImage code32_start low": (make_bzimage(code32_start=0x10000), "below 1 MiB"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_one_clear_line(gm, tmp_path, name):
    image, expect = BAD_IMAGES[name]
    path = write(tmp_path, "kernel image", image)
    with pytest.raises(LoadError) as err:
        load_linux(gm, path, "console=ttyS0")
    msg = one_line(err, path)
    assert expect in msg, msg
    assert not gm.mem.any()


@pytest.mark.parametrize("image, limit", [
    (make_elf(64), 2047),
    (make_bzimage(cmdline_size=100), 100),
    (make_bzimage(version=0x0205), 255),                  # before 2.06: 255 characters
], ids=["elf", "bzimage-cmdline_size", "bzimage-2.05"])
def test_cmdline_limit(gm, tmp_path, image, limit):
    path = write(tmp_path, "kernel", image)
    info = load_linux(gm, path, "a" * limit, prefer_elf_payload=False)
    assert info.cmdline_size == limit
    assert gm.read(CMDLINE_ADDR + limit, 1) == b"\0"
    with pytest.raises(LoadError) as err:
        load_linux(gm, path, "a" * (limit + 1))
    assert f"at most {limit}" in one_line(err, path)
    with pytest.raises(LoadError) as err:
        load_linux(gm, path, "a\0b")
    assert "NUL" in one_line(err, path)


def test_unreadable_files(gm, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LoadError) as err:
        load_linux(gm, missing)
    assert "No such file" in one_line(err, missing)
    with pytest.raises(LoadError) as err:
        load_linux(gm, tmp_path)
    assert "not a regular file" in one_line(err, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LoadError) as err:
        load_linux(gm, fifo)                              # must not block waiting for a writer
    assert "not a regular file" in one_line(err, fifo)
    with pytest.raises(LoadError) as err:
        load_linux(gm, "/dev/zero")                      # must not read forever
    assert "not a regular file" in one_line(err, "/dev/zero")
    empty = write(tmp_path, "empty", b"")
    with pytest.raises(LoadError) as err:
        load_linux(gm, empty)
    assert "empty" in one_line(err, empty)
    kpath = write(tmp_path, "vmlinux", make_elf(64))
    with pytest.raises(LoadError) as err:
        load_linux(gm, kpath, initrd_path=missing)
    assert "initrd" in one_line(err, missing)
    if os.geteuid() != 0:
        os.chmod(kpath, 0)
        with pytest.raises(LoadError) as err:
            load_linux(gm, kpath)
        assert "Permission denied" in one_line(err, kpath)


def test_too_little_memory(tmp_path):
    tiny = GuestMemory(1 * MiB)
    try:
        path = write(tmp_path, "vmlinux", make_elf(64))
        with pytest.raises(LoadError) as err:
            load_linux(tiny, path)
        assert "too little memory" in one_line(err, path)
    finally:
        tiny.close()


# ---------------------------------------------------------------------------
# A real kernel, when this machine has one


REAL_KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))
if os.environ.get("LGUEST_JIT_TEST_BZIMAGE"):
    REAL_KERNELS.append(os.environ["LGUEST_JIT_TEST_BZIMAGE"])


def _default_guest_bzimage():
    """The default guest's bzImage, when `python -m guest.build --bzimage` made one."""
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from guest.build import cached_kernel
    vmlinux = cached_kernel()
    bz = vmlinux.parent / "bzImage" if vmlinux is not None else None
    return str(bz) if bz is not None and bz.is_file() else None


if not REAL_KERNELS:
    REAL_KERNELS += [k for k in [_default_guest_bzimage()] if k is not None]


@pytest.mark.skipif(not REAL_KERNELS, reason="no /boot/vmlinuz-*, $LGUEST_JIT_TEST_BZIMAGE or default-guest bzImage here")
def test_real_bzimage():
    path = REAL_KERNELS[-1]
    if not os.access(path, os.R_OK):
        pytest.skip(f"{path} is not readable")
    g = GuestMemory(512 * MiB)
    try:
        info = load_linux(g, path, "console=ttyS0", prefer_elf_payload=False)
        assert info.kind == "bzimage" and info.mode == "protected"
        assert info.protocol >= 0x020A
        assert g.read(BOOT_PARAMS_ADDR + 0x202, 4) == b"HdrS"
        with open(path, "rb") as f:
            image = f.read()
        setup = ((image[0x1F1] or 4) + 1) * 512
        assert g.read(info.entry, 4096) == image[setup:setup + 4096]
        # The payload: decoded when the codec is here, else a stated reason.
        info = load_linux(g, path, "console=ttyS0", prefer_elf_payload=True)
        if info.kind == "bzimage-payload-elf":
            assert info.mode == "long" and info.kernel_start <= info.entry < info.kernel_end
            assert translate(g.mem, info.cr3, info.entry) == info.entry
        else:
            assert "not available" in info.payload, info.payload
    finally:
        g.close()


# ---------------------------------------------------------------------------
# End to end: what the loader built really boots (tiny guests under KVM)


def _kvm_missing():
    try:
        from lguest_jit.hw.kvm import kvm_available
    except Exception as e:                                  # backend not importable here
        return str(e)
    return kvm_available()


KVM_MISSING = _kvm_missing()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"no usable KVM: {KVM_MISSING}")
REPORT_PORT = 0xF4

# The same bytes run in 32-bit protected mode and in 64-bit mode:
#   mov ax, 0x18; mov ds, ax reload DS from the loader's GDT
#   mov eax, [esi+0x228]     boot_params.cmd_line_ptr
#   mov al, [eax]            first command-line byte
#   mov edx, 0xf4; out dx, al
#   mov eax, [esi+0x218]     boot_params.ramdisk_image
#   mov al, [eax]; out dx, al
#   mov al, [esi+0x210]; out dx, al    type_of_loader
REPORTER = bytes.fromhex("66b81800" "8ed8" "8b8628020000" "8a00" "baf4000000" "ee"
                         "8b8618020000" "8a00" "ee" "8a8610020000" "ee")
# 64-bit only, first: reload CS through the GDT with a far return.
#   mov esp, 0x6000 (a stack below the zero page); lea rax, [rip+5]; push 0x10; push rax; retfq
FAR_RETURN_64 = bytes.fromhex("bc00600000" "488d0505000000" "6a10" "50" "48cb")
# 32-bit only, first: reload CS with a far jump to the next instruction (patched).
SPIN = bytes.fromhex("ebfe")


def report_bus(gm):
    """A PCI bus that records bytes written to REPORT_PORT (the third one
    stops the run) and answers every other port and address with 0."""
    from lguest_jit import pci

    class ReportBus(pci.Bus):
        def __init__(self):
            super().__init__(gm)
            self.set_fallback(pio=self.on_pio, mmio=lambda addr, size, is_write, value: 0)
            self.out = bytearray()
            self.vm = None

        def on_pio(self, port, size, is_write, value):
            if is_write and port == REPORT_PORT:
                self.out.append(value & 0xFF)
                if len(self.out) == 3:
                    self.vm.stop()
            return 0

    return ReportBus()


def boot_and_report(gm, info):
    from lguest_jit.vcpu import KvmVm
    bus = report_bus(gm)
    vm = KvmVm(gm, bus)
    bus.vm = vm
    try:
        vm.setup_boot(info)
        res = vm.run(timeout=20.0)
        sregs = vm.get_sregs()
    finally:
        vm.close()
    assert res.reason == "stopped", res.report()
    return bytes(bus.out), sregs


@needs_kvm
@pytest.mark.parametrize("kind", ["elf64", "elf32", "bzimage", "bzimage-payload-elf"])
def test_loaded_image_boots_and_sees_boot_params(gm, tmp_path, kind):
    if kind == "elf64":
        # Entry above 16 MiB: reached only through the identity page tables.
        code = FAR_RETURN_64 + REPORTER + SPIN
        image = make_elf(64, entry=0x1000000, segments=[(0x1000000, 0xffffffff81000000, code, 0x1000)])
    elif kind == "elf32":
        ljmp = bytes.fromhex("ea") + struct.pack("<IH", 0x100007, 0x10)
        code = ljmp + REPORTER + SPIN
        image = make_elf(32, entry=0x100000, segments=[(0x100000, 0xc0100000, code, 0x1000)])
    elif kind == "bzimage":
        ljmp = bytes.fromhex("ea") + struct.pack("<IH", 0x100007, 0x10)
        image = make_bzimage(ljmp + REPORTER + SPIN, init_size=0x1000, pref_address=0)
    else:
        code = FAR_RETURN_64 + REPORTER + SPIN
        elf = make_elf(64, entry=0x1000000, segments=[(0x1000000, 0xffffffff81000000, code, 0x1000)])
        image = bzimage_with_payload(kernel_payload("gzip", elf), init_size=0x1000)
    info = load_linux(gm, write(tmp_path, "kernel", image), "Zcmd", initrd_path=write(tmp_path, "rd", b"Qrd"))
    assert info.kind == kind
    out, sregs = boot_and_report(gm, info)
    assert out == b"ZQ\xff"
    assert sregs.cs.selector == 0x10 and sregs.ds.selector == 0x18
    assert sregs.cs.l == (1 if info.mode == "long" else 0)


def test_decompress_payload_codecs():
    from lguest_jit.hw.loader import CodecUnavailable
    data = b"payload " * 1000
    for codec in ("gzip", "bzip2", "xz", "lzma", "lz4"):
        assert decompress_payload(kernel_payload(codec, data), 1 << 20) == (codec, data)
    with pytest.raises(CodecUnavailable, match="lzo"):
        decompress_payload(b"\x89LZO\x00\x0d\x0a\x1a\x0a" + bytes(40), 1 << 20)
    with pytest.raises(ValueError, match="unknown compression"):
        decompress_payload(b"\x00" * 64, 1 << 20)
