"""Load a Linux kernel (and initrd) into guest memory and describe how to enter it.

lguest's contract is ``<mem-in-mb> <vmlinux> [args...]``.  This module is the
``<vmlinux>`` part: it accepts

* an ELF ``vmlinux``: 64-bit (EM_X86_64) entered in long mode with identity
  page tables, or 32-bit (EM_386) entered in flat protected mode;
* a bzImage: either its compressed ELF payload is extracted and booted as
  above (fast under an emulating hypervisor: the decompressor never runs in
  the guest), or, when the codec is not available, its protected-mode code is
  loaded at ``code32_start`` and entered through the 32-bit boot protocol;

and builds the "zero page" (``struct boot_params``), the command line, an
e820 map, a GDT and (long mode) page tables.  Every bad input is refused with
:class:`LoadError` *before* anything is written to guest memory, so a failed
load never leaves a half-built guest behind and no guest code ever runs.

Public API::

    load_linux(gm: GuestMemory, kernel_path, cmdline: str = "",
               initrd_path=None, prefer_elf_payload: bool = True, cpus: int = 1) -> BootInfo
    load_initrd(gm: GuestMemory, path, *, max_addr: int | None = None,
                low_limit: int = HIGH_MEM_START) -> tuple[int, int]   # (addr, size)
    decompress_payload(data: bytes, limit: int) -> tuple[str, bytes]  # (codec, output)
        # raises CodecUnavailable (codec known, not installed) or ValueError
    lz4_legacy_decompress(data: bytes, limit: int, *, compiled: bool | None = None) -> bytes
    identity_map_size(ram_size: int) -> int            # bytes the long-mode page tables map
    class LoadError(Exception)          # str(err) is one line naming the file and the rule
    class CodecUnavailable(LookupError)
    class BootInfo                      # frozen dataclass, fields below
    class Segment                       # frozen dataclass mirroring struct kvm_segment

Guest physical layout (all below 1 MiB, which kernels never occupy)::

    0x000010  MP floating pointer (hw/firmware.py)
    0x000500  GDT: null, null, code (sel 0x10), data (sel 0x18)   GDT_ADDR
    0x007000  boot_params, the "zero page" (4 KiB)                 BOOT_PARAMS_ADDR
    0x009000  PML4, PDPT, then 1-4 page directories (long mode)    PAGE_TABLE_ADDR
    0x020000  command line, NUL-terminated                         CMDLINE_ADDR
    0x09fc00  end of low RAM in the e820 map (EBDA/VGA/BIOS hole)  LOW_RAM_END
    0x0f0000  MP configuration table, one entry per CPU (firmware.MPC_ADDR)
    0x100000  kernel (bzImage code32_start; vmlinux at its p_paddr) HIGH_MEM_START
    top       initrd, page aligned, at the top of RAM below initrd_addr_max

Register state the backend sets (every value is in :class:`BootInfo`):

* long mode (``mode == "long"``): CR0 = PE|ET|PG, CR3 = ``cr3``,
  CR4 = PAE, EFER = LME|LMA, CS = ``code`` (selector 0x10, L=1),
  DS/ES/SS/FS/GS = ``data`` (0x18), RIP = ``entry``, RSI = ``boot_params``,
  RFLAGS = 0x2 (interrupts off), other GPRs 0.
* protected mode (``mode == "protected"``): CR0 = PE|ET, no paging, flat
  4 GiB CS 0x10 (D=1) and DS/ES/SS 0x18, EIP = ``entry``,
  ESI = ``boot_params``, EBP = EDI = EBX = 0 (boot protocol), RFLAGS = 0x2.

GDTR = (``gdt_base``, ``gdt_limit``) in both modes; the GDT in guest memory
matches the hidden segment state in ``code``/``data``, so a guest that
reloads its segment registers gets the same segments.  TR/LDTR are left to
the backend (no TSS descriptor is written).

bzImage payloads: the codec is found by magic, as lib/decompress.c does:
gzip, bzip2, lzma and xz through the standard library, the kernel's legacy
LZ4 frame by our own decoder (a Numba kernel), zstd when the optional
``zstandard`` package is installed; LZO never.  When the payload cannot be
used (codec missing, corrupt data, not an ELF) the bzImage is booted through
its 32-bit entry and ``BootInfo.payload`` says why.

Command line: at most the header's ``cmdline_size`` bytes (protocol 2.06+),
255 before 2.06 (boot.rst), 2047 for an ELF vmlinux (COMMAND_LINE_SIZE).

Sizes: the kernel needs no more than its ELF ``p_memsz`` (or, for a bzImage,
``init_size`` from the preferred load address), the initrd sits above it.
Guest RAM above 4 GiB is not mapped by the page tables and the initrd is
kept below 4 GiB (``ramdisk_image`` is a 32-bit field).
"""
from __future__ import annotations

import bz2
import lzma
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass

import numba
import numpy as np
import psutil
from numba import njit

from .firmware import MAX_CPUS, write_mp_table
from .memory import PAGE_SIZE, GuestMemory
from .x86 import CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME

# ---------------------------------------------------------------------------
# Guest physical layout

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
BOOT_PARAMS_SIZE = 0x1000
PAGE_TABLE_ADDR = 0x9000
CMDLINE_ADDR = 0x20000
CMDLINE_AREA_END = 0x9F000        # the command line buffer may not run into the EBDA
LOW_RAM_END = 0x9FC00
HIGH_MEM_START = 0x100000
MIN_RAM = 2 * HIGH_MEM_START      # room for the boot structures plus *something* above 1 MiB

GIB = 1 << 30
MAX_IDENTITY_MAP = 4 * GIB

# Selectors Linux's boot protocol expects (__BOOT_CS, __BOOT_DS).
BOOT_CS = 0x10
BOOT_DS = 0x18

RFLAGS_RESERVED = 0x2

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7                   # 2 MiB page in a page-directory entry

# ---------------------------------------------------------------------------
# boot_params / setup header offsets (Documentation/arch/x86/boot.rst,
# arch/x86/include/uapi/asm/bootparam.h)

BP_E820_ENTRIES = 0x1E8
BP_SETUP_SECTS = 0x1F1
BP_SYSSIZE = 0x1F4
BP_VID_MODE = 0x1FA
BP_BOOT_FLAG = 0x1FE
BP_JUMP = 0x200                   # 2-byte jump; byte 0x201 is the header length - (0x202 - ...)
BP_HEADER = 0x202
BP_VERSION = 0x206
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_CODE32_START = 0x214
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_INITRD_ADDR_MAX = 0x22C
BP_KERNEL_ALIGNMENT = 0x230
BP_RELOCATABLE = 0x234
BP_CMDLINE_SIZE = 0x238
BP_PAYLOAD_OFFSET = 0x248
BP_PAYLOAD_LENGTH = 0x24C
BP_PREF_ADDRESS = 0x258
BP_INIT_SIZE = 0x260
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128            # what fits between 0x2d0 and 0xcd0
E820_ENTRY_SIZE = 20

SETUP_HEADER_START = BP_SETUP_SECTS
HDRS_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55
LOADED_HIGH = 0x01
TYPE_OF_LOADER_UNDEFINED = 0xFF   # "no assigned ID"
E820_RAM = 1
E820_RESERVED = 2

# Protocol landmarks.
MIN_PROTOCOL = 0x0202             # cmd_line_ptr exists from 2.02
PROTOCOL_INITRD_MAX = 0x0203
PROTOCOL_SYSSIZE32 = 0x0204
PROTOCOL_CMDLINE_SIZE = 0x0206
PROTOCOL_PAYLOAD = 0x0208
PROTOCOL_INIT_SIZE = 0x020A
OLD_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: before 2.03
OLD_CMDLINE_MAX = 255             # boot.rst: before 2.06, characters without the NUL

# The header we write for an ELF vmlinux, which carries none of its own.
SYNTH_VERSION = 0x020F
SYNTH_CMDLINE_SIZE = 2047         # x86 COMMAND_LINE_SIZE is 2048 with the NUL
SYNTH_INITRD_ADDR_MAX = 0x7FFFFFFF
SYNTH_KERNEL_ALIGNMENT = 0x200000
SYNTH_HEADER_END = 0x268          # through init_size

# ELF.
ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1

# Compressed payload magics (lib/decompress.c).
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20


class LoadError(Exception):
    """A kernel or initrd that cannot be loaded.  ``str()`` is one line that
    names the file and the rule it breaks; the CLI prints it as is."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))


@dataclass(frozen=True)
class Segment:
    """Hidden segment-register state, field for field ``struct kvm_segment``
    (limit is in bytes, already scaled by the granularity bit)."""
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name
    g: int
    avl: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor that loads this state."""
        raw_limit = self.limit >> 12 if self.g else self.limit
        access = self.type | self.s << 4 | self.dpl << 5 | self.present << 7
        flags = self.avl | self.l << 1 | self.db << 2 | self.g << 3
        return ((raw_limit & 0xFFFF) | (self.base & 0xFFFFFF) << 16 | access << 40
                | ((raw_limit >> 16) & 0xF) << 48 | flags << 52 | ((self.base >> 24) & 0xFF) << 56)


# type 0xb = code, execute/read, accessed; 0x3 = data, read/write, accessed.
CODE64 = Segment(base=0, limit=0xFFFFFFFF, selector=BOOT_CS, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1)
CODE32 = Segment(base=0, limit=0xFFFFFFFF, selector=BOOT_CS, type=0xB, present=1, dpl=0, db=1, s=1, l=0, g=1)
DATA = Segment(base=0, limit=0xFFFFFFFF, selector=BOOT_DS, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1)


@dataclass(frozen=True)
class BootInfo:
    """Everything the backend needs to start the guest, plus what was loaded.

    kind:  "elf64" | "elf32" | "bzimage" | "bzimage-payload-elf"
    mode:  "long" | "protected"
    entry: RIP/EIP (a guest physical address; paging is identity or off)
    boot_params: RSI/ESI
    cr0, cr3 (None in protected mode), cr4, efer, rflags: initial values
    gdt_base, gdt_limit: GDTR; code, data: hidden state for CS and DS/ES/SS/FS/GS
    kernel_start, kernel_end: guest physical range the kernel may occupy
    initrd_addr, initrd_size: 0, 0 without an initrd
    cmdline_addr, cmdline_size: where the command line is, its length without NUL
    protocol: boot-protocol version in boot_params (ours for a plain ELF)
    payload: for a bzImage, the payload codec used ("gzip", "xz", ...) or
             why the payload was not used (e.g. "zstd: codec not available");
             None for an ELF file or when prefer_elf_payload was False
    """
    kind: str
    mode: str
    entry: int
    boot_params: int
    cr0: int
    cr3: int | None
    cr4: int
    efer: int
    rflags: int
    gdt_base: int
    gdt_limit: int
    code: Segment
    data: Segment
    kernel_start: int
    kernel_end: int
    initrd_addr: int
    initrd_size: int
    cmdline_addr: int
    cmdline_size: int
    protocol: int
    payload: str | None = None

    @property
    def code_selector(self) -> int:
        return self.code.selector

    @property
    def data_selector(self) -> int:
        return self.data.selector


# ---------------------------------------------------------------------------
# Files


def _host_free_bytes() -> int:
    """What the host can give us without swapping (MemAvailable), as the
    CLI's argument check measures it."""
    return psutil.virtual_memory().available


def _read_file(path, what: str, max_size: int | None = None, limit_what: str = "guest RAM") -> bytes:
    """The whole file, or LoadError naming it.  Only regular files: a FIFO or
    a device (/dev/zero) would block or never end.  The size is checked
    against ``max_size`` before a byte is read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LoadError(f"{what} {path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoadError(f"{what} {path}: not a regular file")
        if st.st_size == 0:
            raise LoadError(f"{what} {path}: file is empty")
        if max_size is not None and st.st_size > max_size:
            raise LoadError(f"{what} {path}: too little memory: {st.st_size:#x} bytes, "
                            f"{limit_what} is {max_size:#x}")
        # mmap avoids a second copy of a large vmlinux (debug info and all).
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            return mm[:]
    except OSError as e:
        raise LoadError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def _u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def _u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


# ---------------------------------------------------------------------------
# ELF


@dataclass(frozen=True)
class _ElfSegment:
    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class _ElfImage:
    bits: int
    entry: int
    segments: tuple[_ElfSegment, ...]

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def _parse_elf(data: bytes, name: str, ram_size: int) -> _ElfImage:
    """Validate an x86 ELF executable and return its loadable segments.

    Checked: identification, class matches machine (ELF32/EM_386 or
    ELF64/EM_X86_64), little-endian, ET_EXEC, program headers inside the
    file, every PT_LOAD has filesz <= memsz, its file bytes present, lies in
    RAM at or above 1 MiB; the entry point lies in a loaded segment.
    """
    if len(data) < 16 or data[:4] != ELF_MAGIC:
        raise LoadError(f"{name}: not an ELF file")
    cls, endian = data[4], data[5]
    if cls not in (ELFCLASS32, ELFCLASS64):
        raise LoadError(f"{name}: ELF class {cls} is neither ELFCLASS32 nor ELFCLASS64")
    if endian != ELFDATA2LSB:
        raise LoadError(f"{name}: ELF data encoding {endian} is not little-endian (ELFDATA2LSB)")
    bits = 64 if cls == ELFCLASS64 else 32
    ehsize = 64 if bits == 64 else 52
    if len(data) < ehsize:
        raise LoadError(f"{name}: truncated ELF header ({len(data)} of {ehsize} bytes)")
    if bits == 64:
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = \
            struct.unpack_from("<HHIQQQIHHH", data, 16)
        ph_fmt, ph_size = "<IIQQQQQQ", 56
    else:
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = \
            struct.unpack_from("<HHIIIIIHHH", data, 16)
        ph_fmt, ph_size = "<IIIIIIII", 32
    if e_machine not in (EM_386, EM_X86_64):
        raise LoadError(f"{name}: ELF machine {e_machine} is not x86 (EM_386=3 or EM_X86_64=62)")
    if (e_machine == EM_X86_64) != (bits == 64):
        want = "ELFCLASS64" if e_machine == EM_X86_64 else "ELFCLASS32"
        raise LoadError(f"{name}: ELF class mismatch: {'EM_X86_64' if e_machine == EM_X86_64 else 'EM_386'} "
                        f"requires {want}, file is ELFCLASS{bits}")
    if e_type != ET_EXEC:
        raise LoadError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC)")
    if e_phnum == 0:
        raise LoadError(f"{name}: ELF has no program headers")
    if e_phentsize < ph_size:
        raise LoadError(f"{name}: ELF program header size {e_phentsize} is smaller than {ph_size}")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise LoadError(f"{name}: truncated: program headers end at {e_phoff + e_phnum * e_phentsize:#x}, "
                        f"file is {len(data):#x} bytes")

    segments = []
    entry_phys = None
    for i in range(e_phnum):
        fields = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
        if bits == 64:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = fields
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, _ = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        where = f"{name}: PT_LOAD segment {i} (paddr {p_paddr:#x}, memsz {p_memsz:#x})"
        if p_filesz > p_memsz:
            raise LoadError(f"{where}: p_filesz {p_filesz:#x} > p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise LoadError(f"{where}: truncated: file data ends at {p_offset + p_filesz:#x}, "
                            f"file is {len(data):#x} bytes")
        if p_paddr + p_memsz > ram_size:
            raise LoadError(f"{where}: outside guest RAM ({ram_size >> 20} MiB); too little memory "
                            f"for this kernel or a bad image")
        if p_paddr < HIGH_MEM_START:
            raise LoadError(f"{where}: below 1 MiB, where the boot structures go")
        segments.append(_ElfSegment(p_offset, p_paddr, p_filesz, p_memsz))
        # vmlinux's e_entry is physical (phys_startup_64); accept a virtual
        # one too by translating through the segment that holds it.
        if entry_phys is None:
            if p_paddr <= e_entry < p_paddr + p_memsz:
                entry_phys = e_entry
            elif p_vaddr <= e_entry < p_vaddr + p_memsz:
                entry_phys = e_entry - p_vaddr + p_paddr
    if not segments:
        raise LoadError(f"{name}: ELF has no loadable (PT_LOAD) segments")
    if entry_phys is None:
        raise LoadError(f"{name}: ELF entry point {e_entry:#x} is not inside any loaded segment")
    return _ElfImage(bits, entry_phys, tuple(segments))


def _write_elf(gm: GuestMemory, data: bytes, image: _ElfImage) -> None:
    for seg in image.segments:
        dst = gm.mem[seg.paddr:seg.paddr + seg.memsz]
        dst[:seg.filesz] = np.frombuffer(data, dtype=np.uint8, count=seg.filesz, offset=seg.offset)
        dst[seg.filesz:] = 0      # bss


# ---------------------------------------------------------------------------
# bzImage


@dataclass(frozen=True)
class _BzImage:
    protocol: int
    header: bytes                 # the setup header, 0x1f1 .. its end
    pm_offset: int                # protected-mode code in the file
    pm_size: int
    code32_start: int
    kernel_end: int               # load address + everything the decompressor needs
    initrd_addr_max: int
    cmdline_max: int
    payload_offset: int
    payload_length: int


def _parse_bzimage(data: bytes, name: str) -> _BzImage:
    if len(data) < BP_HEADER + 4 or data[BP_HEADER:BP_HEADER + 4] != HDRS_MAGIC:
        raise LoadError(f"{name}: bad magic: no 'HdrS' setup header at {BP_HEADER:#x} (not a bzImage)")
    if len(data) < 0x268:
        raise LoadError(f"{name}: truncated bzImage: {len(data)} bytes, shorter than the setup header")
    if _u16(data, BP_BOOT_FLAG) != BOOT_FLAG_MAGIC:
        raise LoadError(f"{name}: bad magic: boot_flag at {BP_BOOT_FLAG:#x} is {_u16(data, BP_BOOT_FLAG):#06x}, "
                        f"not 0xaa55")
    protocol = _u16(data, BP_VERSION)
    if protocol < MIN_PROTOCOL:
        raise LoadError(f"{name}: boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is too old "
                        f"(need 2.02 or later)")
    if not data[BP_LOADFLAGS] & LOADED_HIGH:
        raise LoadError(f"{name}: a zImage (loadflags without LOADED_HIGH) is not supported; use a bzImage")
    setup_sects = data[BP_SETUP_SECTS] or 4      # boot.rst: 0 means 4
    pm_offset = (setup_sects + 1) * 512
    # The byte at 0x201 is the header's length past 0x202, so the header
    # always ends (<= 0x301) inside the smallest setup area (0x400).
    header_end = BP_HEADER + data[BP_JUMP + 1]
    if len(data) <= pm_offset:
        raise LoadError(f"{name}: truncated bzImage: {len(data)} bytes, setup alone is {pm_offset} bytes")
    pm_size = len(data) - pm_offset
    if protocol >= PROTOCOL_SYSSIZE32:
        sys_bytes = _u32(data, BP_SYSSIZE) * 16
        if sys_bytes > pm_size:
            raise LoadError(f"{name}: truncated bzImage: header says {sys_bytes:#x} bytes of kernel code, "
                            f"file has {pm_size:#x}")
        pm_size = sys_bytes or pm_size
    code32_start = _u32(data, BP_CODE32_START)
    if code32_start < HIGH_MEM_START:
        raise LoadError(f"{name}: code32_start {code32_start:#x} is below 1 MiB, where the boot structures go")

    kernel_end = code32_start + pm_size
    if protocol >= PROTOCOL_INIT_SIZE:
        # The decompressor unpacks to max(load address, pref_address) and
        # needs init_size bytes there (boot.rst, init_size).
        pref = _u64(data, BP_PREF_ADDRESS)
        base = max(code32_start, pref if pref < MAX_IDENTITY_MAP else 0)
        kernel_end = max(kernel_end, base + _u32(data, BP_INIT_SIZE))

    initrd_max = _u32(data, BP_INITRD_ADDR_MAX) if protocol >= PROTOCOL_INITRD_MAX else OLD_INITRD_ADDR_MAX
    cmdline_max = _u32(data, BP_CMDLINE_SIZE) if protocol >= PROTOCOL_CMDLINE_SIZE else OLD_CMDLINE_MAX
    payload_offset = payload_length = 0
    if protocol >= PROTOCOL_PAYLOAD:
        payload_offset = _u32(data, BP_PAYLOAD_OFFSET)
        payload_length = _u32(data, BP_PAYLOAD_LENGTH)
        if payload_length and payload_offset + payload_length > pm_size:
            raise LoadError(f"{name}: truncated bzImage: payload ends at {payload_offset + payload_length:#x} "
                            f"in the kernel code, which is {pm_size:#x} bytes")
    return _BzImage(protocol, bytes(data[SETUP_HEADER_START:header_end]), pm_offset, pm_size,
                    code32_start, kernel_end, initrd_max, cmdline_max, payload_offset, payload_length)


# ---------------------------------------------------------------------------
# Payload decompression


def lz4_legacy_decompress(data: bytes, limit: int, *, compiled: bool | None = None) -> bytes:
    """Decode the kernel's LZ4 "legacy" frame: magic 0x184C2102, then blocks
    of at most 8 MiB output, each preceded by its compressed size (le32).
    Anything after the last block that does not fit as a block ends the
    stream; when that is exactly 4 bytes it is the kernel's size trailer and
    must equal the decoded length.  Raises ValueError on bad data or
    output beyond ``limit``.

    ``compiled``: decode blocks with the Numba kernel (True) or with the
    slice-based Python decoder (False); default: the kernel unless
    NUMBA_DISABLE_JIT is set (a byte loop in plain Python is far slower than
    slicing).  A 53 MiB vmlinux: about 4.5 s in Python, well under 1 s compiled.
    """
    if len(data) < 4 or _u32(data, 0) != _LZ4_LEGACY_MAGIC:
        raise ValueError("not an LZ4 legacy frame")
    if compiled is None:
        compiled = not numba.config.DISABLE_JIT
    src = np.frombuffer(data, dtype=np.uint8)
    scratch = np.empty(_LZ4_LEGACY_BLOCK, dtype=np.uint8) if compiled else None
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        size = _u32(data, pos)
        if size == _LZ4_LEGACY_MAGIC:       # concatenated frames
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break                           # the size trailer, or padding
        if compiled:
            n = _lz4_block_kernel(src, pos + 4, pos + 4 + size, scratch)
            if n < 0:
                raise ValueError(f"corrupt LZ4 block: {_LZ4_ERRORS[-n]}")
            out += scratch[:n].tobytes()
        else:
            _lz4_block_into(out, data[pos + 4:pos + 4 + size])
        pos += 4 + size
        if len(out) > limit:
            raise ValueError(f"output exceeds {limit:#x} bytes")
    if not out:
        raise ValueError("LZ4 frame holds no blocks")
    if len(data) - pos == 4 and _u32(data, pos) != len(out):
        # The kernel build appends the uncompressed size: a cheap end-to-end check.
        raise ValueError(f"size trailer says {_u32(data, pos):#x} bytes, decoded {len(out):#x}")
    return bytes(out)


# LZ4 block format errors (lz4 block format description: sequences of
# token, literals, 2-byte offset, match length).
_LZ4_LITERALS = 1
_LZ4_OFFSET_TRUNCATED = 2
_LZ4_OFFSET = 3
_LZ4_TOO_BIG = 4
_LZ4_ERRORS = {
    _LZ4_LITERALS: "literal length or literals run off the end of the block",
    _LZ4_OFFSET_TRUNCATED: "truncated match offset or match length",
    _LZ4_OFFSET: "match offset 0 or before the start of the block",
    _LZ4_TOO_BIG: "more than 8 MiB of output from one block",
}


def _lz4_length_py(src, i, end, length):
    """An LZ4 length that continues past its token's 15: bytes are added
    until one is not 255.  Returns (length, index after it), the index -1
    when the bytes run past ``end``.  One definition for both decoders: the
    Python one calls it as is, the kernel its compiled form."""
    while True:
        if i >= end:
            return length, -1
        b = int(src[i])
        i += 1
        length += b
        if b != 255:
            return length, i


_lz4_length = njit(nogil=True, cache=True, inline='always')(_lz4_length_py)


@njit(nogil=True, cache=True)
def _lz4_block_kernel(src, start, end, dst):
    """Decode the LZ4 block src[start:end] into dst; return the output
    length or a negated _LZ4_* code.  Every read is below ``end``, every
    write below ``dst.size``."""
    i = start
    o = 0
    cap = dst.size
    while i < end:
        token = np.int64(src[i])
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _lz4_length(src, i, end, lit)
            if i < 0:
                return -_LZ4_LITERALS
        if lit > end - i:
            return -_LZ4_LITERALS
        if lit > cap - o:
            return -_LZ4_TOO_BIG
        dst[o:o + lit] = src[i:i + lit]
        o += lit
        i += lit
        if i == end:
            break                           # the last sequence has no match
        if end - i < 2:
            return -_LZ4_OFFSET_TRUNCATED
        offset = np.int64(src[i]) | np.int64(src[i + 1]) << 8
        i += 2
        mlen = token & 15
        if mlen == 15:
            mlen, i = _lz4_length(src, i, end, mlen)
            if i < 0:
                return -_LZ4_OFFSET_TRUNCATED
        mlen += 4
        if offset == 0 or offset > o:
            return -_LZ4_OFFSET
        if mlen > cap - o:
            return -_LZ4_TOO_BIG
        if offset >= mlen:
            dst[o:o + mlen] = dst[o - offset:o - offset + mlen]
        else:
            # Byte by byte: an overlapping match repeats its last `offset` bytes.
            for k in range(mlen):
                dst[o + k] = dst[o + k - offset]
        o += mlen
    return o


def _lz4_block_into(out: bytearray, src: bytes) -> None:
    """Append one decoded LZ4 block to ``out`` (blocks are independent in
    the legacy format, so matches reach back only inside this block)."""
    start = len(out)
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _lz4_length_py(src, i, n, lit)
            if i < 0:
                raise ValueError("corrupt LZ4 block: literal length runs off the end")
        if i + lit > n:
            raise ValueError("corrupt LZ4 block: literals run off the end")
        out += src[i:i + lit]
        i += lit
        if i == n:
            break                           # the last sequence has no match
        if i + 2 > n:
            raise ValueError("corrupt LZ4 block: truncated match offset")
        offset = src[i] | src[i + 1] << 8
        i += 2
        mlen = token & 15
        if mlen == 15:
            mlen, i = _lz4_length_py(src, i, n, mlen)
            if i < 0:
                raise ValueError("corrupt LZ4 block: match length runs off the end")
        mlen += 4
        if offset == 0 or offset > len(out) - start:
            raise ValueError("corrupt LZ4 block: match offset outside the block")
        if len(out) - start + mlen > _LZ4_LEGACY_BLOCK:
            raise ValueError("corrupt LZ4 block: more than 8 MiB of output")
        pos = len(out) - offset
        if offset >= mlen:
            out += out[pos:pos + mlen]
        else:
            # Overlapping copy: the match repeats its last `offset` bytes.
            chunk = out[pos:]
            reps, rem = divmod(mlen, offset)
            out += chunk * reps + chunk[:rem]


def _stream(decomp, data: bytes, limit: int) -> bytes:
    """Run a zlib/lzma/bz2 decompressor object to the end of its stream,
    ignoring what follows it (the kernel's size trailer)."""
    out = decomp.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"output exceeds {limit:#x} bytes")
    if not decomp.eof:
        raise ValueError("compressed stream is truncated")
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    import zstandard                                    # optional
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)[:limit + 1]


# (name, magic, decoder) in the order lib/decompress.c tries them.
_CODECS = (
    ("gzip", b"\x1f\x8b", lambda d, n: _stream(zlib.decompressobj(wbits=31), d, n)),
    ("bzip2", b"BZh", lambda d, n: _stream(bz2.BZ2Decompressor(), d, n)),
    ("lzma", b"\x5d\x00", lambda d, n: _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), d, n)),
    ("xz", b"\xfd7zXZ\x00", lambda d, n: _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), d, n)),
    ("lzo", b"\x89LZO", None),
    ("lz4", b"\x02\x21\x4c\x18", lz4_legacy_decompress),
    ("zstd", b"\x28\xb5\x2f\xfd", _zstd),
)


class CodecUnavailable(LookupError):
    """The payload's compression is recognised but no decoder is installed."""


def decompress_payload(data: bytes, limit: int) -> tuple[str, bytes]:
    """Identify a bzImage payload's compression by its magic and decode it.

    Returns (codec name, output).  Raises :class:`CodecUnavailable` when the
    codec is known but not installed, ValueError for unknown magic, corrupt
    data or more than ``limit`` bytes.  Trailing bytes after the compressed
    stream (the kernel's 4-byte size trailer) are ignored.
    """
    for codec, magic, decode in _CODECS:
        if data.startswith(magic):
            if decode is None:
                raise CodecUnavailable(f"{codec}: codec not available")
            try:
                out = decode(data, limit)
            except ImportError:
                raise CodecUnavailable(f"{codec}: codec not available (install the Python package)") from None
            except (ValueError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
                raise ValueError(f"{codec}: {e}") from None
            if len(out) > limit:
                raise ValueError(f"{codec}: output exceeds {limit:#x} bytes")
            return codec, out
    raise ValueError(f"unknown compression (magic {data[:6].hex()})")


# ---------------------------------------------------------------------------
# initrd


def _place_initrd(size: int, ram_size: int, max_addr: int, low_limit: int, name: str) -> int:
    """Page-aligned address of an initrd of ``size`` bytes as high as it can
    go: it must end within RAM, at or below ``max_addr`` (inclusive, the
    header's initrd_addr_max) and below 4 GiB, and start at or above
    ``low_limit`` (the end of the kernel)."""
    top = min(ram_size, max_addr + 1, MAX_IDENTITY_MAP)
    addr = (top - size) & ~(PAGE_SIZE - 1)
    if size > top or addr < low_limit:
        raise LoadError(f"initrd {name}: too little memory: {size:#x} bytes do not fit between the kernel "
                        f"(ends {low_limit:#x}) and {top:#x}; guest has {ram_size >> 20} MiB")
    return addr


def load_initrd(gm: GuestMemory, path, *, max_addr: int | None = None,
                low_limit: int = HIGH_MEM_START) -> tuple[int, int]:
    """Copy an initrd to the page-aligned top of guest RAM; return (addr, size).

    ``max_addr`` is the highest byte the initrd may occupy (the setup
    header's initrd_addr_max; default: end of RAM below 4 GiB);
    ``low_limit`` is where the kernel ends.  LoadError when it does not fit.
    """
    data = _read_file(path, "initrd", gm.size)
    addr = _place_initrd(len(data), gm.size, MAX_IDENTITY_MAP - 1 if max_addr is None else max_addr,
                         low_limit, path)
    gm.mem[addr:addr + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return addr, len(data)


# ---------------------------------------------------------------------------
# boot_params, GDT, page tables


def _synth_header() -> bytes:
    """A setup header for a kernel loaded from ELF: just what a 64-bit or
    32-bit vmlinux entry reads (protocol version, magics, limits)."""
    hdr = bytearray(SYNTH_HEADER_END - SETUP_HEADER_START)

    def put(fmt, off, val):
        struct.pack_into(fmt, hdr, off - SETUP_HEADER_START, val)
    put("<H", BP_BOOT_FLAG, BOOT_FLAG_MAGIC)
    put("<B", BP_JUMP + 1, SYNTH_HEADER_END - BP_HEADER)
    hdr[BP_HEADER - SETUP_HEADER_START:BP_HEADER - SETUP_HEADER_START + 4] = HDRS_MAGIC
    put("<H", BP_VERSION, SYNTH_VERSION)
    put("<B", BP_LOADFLAGS, LOADED_HIGH)
    put("<I", BP_CODE32_START, HIGH_MEM_START)
    put("<I", BP_INITRD_ADDR_MAX, SYNTH_INITRD_ADDR_MAX)
    put("<I", BP_KERNEL_ALIGNMENT, SYNTH_KERNEL_ALIGNMENT)
    put("<I", BP_CMDLINE_SIZE, SYNTH_CMDLINE_SIZE)
    return bytes(hdr)


def _e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    return [(0, LOW_RAM_END, E820_RAM),
            (LOW_RAM_END, HIGH_MEM_START - LOW_RAM_END, E820_RESERVED),
            (HIGH_MEM_START, ram_size - HIGH_MEM_START, E820_RAM)]


def _write_boot_params(gm: GuestMemory, header: bytes, cmdline: bytes,
                       initrd_addr: int, initrd_size: int) -> None:
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_START:SETUP_HEADER_START + len(header)] = header
    struct.pack_into("<H", bp, BP_VID_MODE, 0xFFFF)          # "normal" video mode
    bp[BP_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[BP_LOADFLAGS] |= LOADED_HIGH
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, initrd_addr, initrd_size)
    e820 = _e820_map(gm.size)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + i * E820_ENTRY_SIZE, addr, size, kind)
    gm.write(BOOT_PARAMS_ADDR, bp)
    gm.write(CMDLINE_ADDR, cmdline + b"\0")


def _write_gdt(gm: GuestMemory, code: Segment, data: Segment) -> int:
    """null, null, code at 0x10, data at 0x18; returns the GDT limit."""
    gm.write(GDT_ADDR, struct.pack("<4Q", 0, 0, code.descriptor(), data.descriptor()))
    return 4 * 8 - 1


def identity_map_size(ram_size: int) -> int:
    """How much the long-mode page tables map: always the low 4 GiB, so
    both RAM (up to 4 GiB) and the PCI MMIO window below 4 GiB are reachable
    before the guest installs page tables of its own."""
    return MAX_IDENTITY_MAP


def _write_page_tables(gm: GuestMemory) -> int:
    """Identity map with 2 MiB pages: PML4[0] -> PDPT, PDPT[i] -> PD i.
    Returns the PML4 address (CR3)."""
    ngib = identity_map_size(gm.size) // GIB
    pml4, pdpt = PAGE_TABLE_ADDR, PAGE_TABLE_ADDR + PAGE_SIZE
    pds = pdpt + PAGE_SIZE
    tables = np.zeros((2 + ngib) * 512, dtype=np.uint64)
    tables[0] = pdpt | PTE_PRESENT | PTE_WRITE
    for i in range(ngib):
        tables[512 + i] = (pds + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITE
    pages = np.arange(ngib * 512, dtype=np.uint64) << np.uint64(21)
    tables[1024:] = pages | np.uint64(PTE_PRESENT | PTE_WRITE | PTE_PS)
    gm.write(pml4, tables.astype("<u8").tobytes())
    return pml4


# ---------------------------------------------------------------------------
# The loader


def _encode_cmdline(cmdline: str, limit: int, name: str) -> bytes:
    raw = cmdline.encode("utf-8")
    if b"\0" in raw:
        raise LoadError(f"{name}: command line contains a NUL byte")
    limit = min(limit, CMDLINE_AREA_END - CMDLINE_ADDR - 1)
    if len(raw) > limit:
        raise LoadError(f"{name}: command line is {len(raw)} bytes, the kernel accepts at most {limit}")
    return raw


def load_linux(gm: GuestMemory, kernel_path, cmdline: str = "", initrd_path=None,
               prefer_elf_payload: bool = True, cpus: int = 1) -> BootInfo:
    """Load a vmlinux ELF or a bzImage (and an initrd) into ``gm``; the MP
    table lists ``cpus`` processors.

    Everything is validated before guest memory is touched; any problem is a
    :class:`LoadError` whose message is one line naming the file.
    """
    name = str(kernel_path)
    if not 1 <= cpus <= MAX_CPUS:
        raise LoadError(f"{name}: the MP table lists 1 to {MAX_CPUS} processors, not {cpus}")
    if gm.size < MIN_RAM:
        raise LoadError(f"{name}: too little memory: guest has {gm.size:#x} bytes, need at least "
                        f"{MIN_RAM >> 20} MiB")
    # The file is copied into host memory whole (a vmlinux may be far larger
    # than guest RAM: debug info), so the host's free memory is the limit.
    data = _read_file(kernel_path, "kernel", _host_free_bytes(), "the host's free memory")
    initrd = _read_file(initrd_path, "initrd", gm.size) if initrd_path is not None else None

    bz = None
    elf = None
    elf_data = data
    payload_note = None
    if data.startswith(ELF_MAGIC):
        elf = _parse_elf(data, name, gm.size)
        kind = "elf64" if elf.bits == 64 else "elf32"
    elif data[BP_HEADER:BP_HEADER + 4] == HDRS_MAGIC:
        bz = _parse_bzimage(data, name)
        kind = "bzimage"
        if prefer_elf_payload:
            if not bz.payload_length:
                payload_note = f"no payload recorded (boot protocol {bz.protocol:#x})"
            else:
                start = bz.pm_offset + bz.payload_offset
                try:
                    codec, elf_data = decompress_payload(data[start:start + bz.payload_length], gm.size)
                except (CodecUnavailable, ValueError) as e:
                    payload_note = str(e)
                else:
                    if not elf_data.startswith(ELF_MAGIC):
                        payload_note = f"{codec}: payload is not an ELF image"
                    else:
                        elf = _parse_elf(elf_data, f"{name} (payload, {codec})", gm.size)
                        kind = "bzimage-payload-elf"
                        payload_note = codec
    elif len(data) >= BP_BOOT_FLAG + 2 and _u16(data, BP_BOOT_FLAG) == BOOT_FLAG_MAGIC:
        raise LoadError(f"{name}: bad magic: boot sector without a 'HdrS' setup header (not a bzImage)")
    else:
        raise LoadError(f"{name}: not a kernel: neither an ELF vmlinux nor a bzImage")

    # Limits from the header the kernel will see.
    if bz is not None:
        header, protocol = bz.header, bz.protocol
        initrd_max, cmdline_max = bz.initrd_addr_max, bz.cmdline_max
    else:
        header, protocol = _synth_header(), SYNTH_VERSION
        initrd_max, cmdline_max = SYNTH_INITRD_ADDR_MAX, SYNTH_CMDLINE_SIZE
    raw_cmdline = _encode_cmdline(cmdline, cmdline_max, name)
    if elf is not None:
        kernel_start, kernel_end = elf.start, elf.end
    else:
        kernel_start, kernel_end = bz.code32_start, bz.kernel_end
        if kernel_end > gm.size:
            raise LoadError(f"{name}: too little memory: the kernel needs guest RAM up to {kernel_end:#x} "
                            f"({-(-kernel_end >> 20)} MiB), guest has {gm.size >> 20} MiB")
    initrd_addr = initrd_size = 0
    if initrd is not None:
        initrd_size = len(initrd)
        initrd_addr = _place_initrd(initrd_size, gm.size, initrd_max, _page_up(kernel_end), str(initrd_path))

    # Everything checked: now write.
    gm.mem[:HIGH_MEM_START] = 0
    if bz is not None and elf is None:
        gm.mem[bz.code32_start:bz.code32_start + bz.pm_size] = \
            np.frombuffer(data, dtype=np.uint8, count=bz.pm_size, offset=bz.pm_offset)
    else:
        _write_elf(gm, elf_data, elf)
    if initrd is not None:
        gm.mem[initrd_addr:initrd_addr + initrd_size] = np.frombuffer(initrd, dtype=np.uint8)
    _write_boot_params(gm, header, raw_cmdline, initrd_addr, initrd_size)
    write_mp_table(gm, cpus)      # ends Linux's MP-table scan at its first look

    if elf is not None and elf.bits == 64:
        code, seg_data = CODE64, DATA
        gdt_limit = _write_gdt(gm, code, seg_data)
        cr3 = _write_page_tables(gm)
        mode, entry = "long", elf.entry
        cr0, cr4, efer = CR0_PE | CR0_ET | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA
    else:
        code, seg_data = CODE32, DATA
        gdt_limit = _write_gdt(gm, code, seg_data)
        cr3 = None
        mode = "protected"
        entry = elf.entry if elf is not None else bz.code32_start
        cr0, cr4, efer = CR0_PE | CR0_ET, 0, 0

    return BootInfo(kind=kind, mode=mode, entry=entry, boot_params=BOOT_PARAMS_ADDR,
                    cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, rflags=RFLAGS_RESERVED,
                    gdt_base=GDT_ADDR, gdt_limit=gdt_limit, code=code, data=seg_data,
                    kernel_start=kernel_start, kernel_end=kernel_end,
                    initrd_addr=initrd_addr, initrd_size=initrd_size,
                    cmdline_addr=CMDLINE_ADDR, cmdline_size=len(raw_cmdline),
                    protocol=protocol, payload=payload_note if bz is not None else None)


__all__ = [
    "LoadError", "CodecUnavailable", "BootInfo", "Segment", "load_linux", "load_initrd", "decompress_payload",
    "lz4_legacy_decompress", "identity_map_size",
    "GDT_ADDR", "BOOT_PARAMS_ADDR", "PAGE_TABLE_ADDR", "CMDLINE_ADDR", "LOW_RAM_END", "HIGH_MEM_START",
    "BOOT_CS", "BOOT_DS",
]
