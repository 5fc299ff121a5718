"""Target: the x86 device-access decoders (hw/decode.py).  Any 15 bytes:
an accepted MMIO mov or in/out/cli must be exactly what capstone says
(length, register, width, direction, port, high byte); the single and bulk
entry points must agree."""
from __future__ import annotations

import numpy as np

from lguest_jit.hw import decode
from test_decode import CS32, CS64, capstone_mmio, capstone_pio

from .common import Reader, digest, main


def one_input(data: bytes) -> str:
    r = Reader(data)
    mode64 = bool(r.u8() & 1)
    n = r.u8() % 16
    insn = r.take(15)[:n] if n else r.take(15)
    m = decode.decode_mmio(insn, mode64)
    p = decode.decode_pio(insn)
    md = CS64 if mode64 else CS32
    if m.ok:
        assert (m.length, m.reg, m.width, m.is_write, m.high) == capstone_mmio(md, bytes(insn[:m.length])), \
            (insn.hex(), m)
    if p.ok:
        assert (p.length, p.reg, p.width, p.is_write, p.port) == capstone_pio(md, bytes(insn[:p.length])), \
            (insn.hex(), p)
    row = np.zeros((1, 15), np.uint8)
    row[0, :len(insn)] = np.frombuffer(insn, np.uint8)
    bulk = decode.decode_mmio_bulk(row, np.array([len(insn)]), mode64=mode64)
    assert tuple(int(x) for x in bulk[0]) == tuple(m), (insn.hex(), bulk[0], m)
    return digest(tuple(m), tuple(p))


if __name__ == "__main__":
    main("fuzz.fuzz_decode")
