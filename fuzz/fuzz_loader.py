"""Target: the kernel/initrd loaders (hw/loader.py) on malformed ELF,
bzImage and compressed payloads.  load_linux may only succeed or raise
LoadError; a success must place the kernel, initrd and boot structures
inside guest RAM.  decompress_payload may only return at most ``limit``
bytes or raise ValueError/CodecUnavailable."""
from __future__ import annotations

import os

from lguest_jit.hw import loader
from lguest_jit.hw.memory import GuestMemory

from .common import Reader, digest, main

RAM = 4 << 20
_state = None


def _files():
    global _state
    if _state is None:
        _state = (GuestMemory(RAM), os.memfd_create("fuzz-kernel", os.MFD_CLOEXEC),
                  os.memfd_create("fuzz-initrd", os.MFD_CLOEXEC))
    return _state


def _put(fd, data):
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def one_input(data: bytes) -> str:
    gm, kfd, ifd = _files()
    r = Reader(data)
    mode = r.u8() % 3
    if mode == 2:
        limit = 1 + r.u32() % RAM
        try:
            codec, out = loader.decompress_payload(r.data[r.pos:], limit)
        except (ValueError, loader.CodecUnavailable) as exc:
            return digest("refused", type(exc).__name__)
        assert len(out) <= limit, (codec, len(out), limit)
        return digest(codec, out)
    split = r.u16() if mode == 1 else 0
    rest = r.data[r.pos:]
    kernel, initrd = (rest[:split], rest[split:]) if mode == 1 else (rest, None)
    _put(kfd, kernel)
    if initrd is not None:
        _put(ifd, initrd)
    try:
        info = loader.load_linux(gm, f"/proc/self/fd/{kfd}", "console=ttyS0",
                                 f"/proc/self/fd/{ifd}" if initrd is not None else None)
    except loader.LoadError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg
        return digest("refused", msg.split(":")[-1])
    assert 0 <= info.kernel_start <= info.kernel_end <= RAM, info
    assert info.initrd_addr + info.initrd_size <= RAM, info
    if initrd is not None:
        assert info.initrd_addr >= info.kernel_end and info.initrd_size == len(initrd), info
    return digest(info.kind, info.mode, info.entry, info.kernel_end, info.initrd_addr, gm.mem[:2 << 20].tobytes())


if __name__ == "__main__":
    main("fuzz.fuzz_loader")
