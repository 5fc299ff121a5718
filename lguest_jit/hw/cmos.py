"""A minimal MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71
(data).

Why: with nothing at these ports every read is 0xFF, so the update-in-
progress bit looks set forever and Linux's boot-time clock read
(``mc146818_avoid_UIP``) waits out its timeout (about 2 s of guest time on
our emulating hosts) before giving up and starting at 1970.  With this the
guest reads the host's UTC time at once.

What it models: the time and date registers (BCD or binary, 24- or 12-hour,
as status register B says), status A with UIP always clear, B writable,
C read-to-clear (no interrupt sources), D with the valid-RAM bit, and the
rest of the 128 bytes as plain RAM.  A guest that sets the clock (B.SET,
write the registers, clear B.SET) moves its own clock by an offset from the
host's; the host clock is never touched.  No alarm or periodic interrupts.

Register numbers follow the MC146818 datasheet (Linux: include/linux/mc146818rtc.h).
"""
from __future__ import annotations

import calendar
import time

INDEX_PORT, DATA_PORT = 0x70, 0x71

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32                   # where PC firmware keeps the century byte

A_DIVIDER_32KHZ_1024HZ = 0x26    # UIP (bit 7) always clear
B_SET, B_DM_BINARY, B_24H = 0x80, 0x04, 0x02
D_VRT = 0x80                     # the clock's RAM and time are valid
HOUR_PM = 0x80                   # in 12-hour mode
NMI_DISABLE = 0x80               # bit 7 of an index write, not part of the index

TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    """``pio(port, size, is_write, value)`` is the bus handler; ``now()``
    returns host UTC seconds (a parameter for tests)."""

    def __init__(self, now=time.time):
        self.now = now
        self.index = 0
        self.ram = bytearray(128)
        self.ram[STATUS_A] = A_DIVIDER_32KHZ_1024HZ
        self.ram[STATUS_B] = B_24H           # BCD and 24-hour, as PC firmware leaves it
        self.ram[STATUS_D] = D_VRT
        self.offset = 0                      # guest clock minus host clock, seconds
        self.pending = {}                    # time registers written while B.SET is on

    def save_state(self) -> dict:
        """Index, RAM and the guest's clock offset (a snapshot).  The offset
        is relative to host time, so a restored guest's wall clock reads
        the host's time as before, not the moment of the snapshot."""
        return {"index": self.index, "ram": bytes(self.ram), "offset": self.offset,
                "pending": {str(k): v for k, v in self.pending.items()}}

    def load_state(self, st: dict) -> None:
        ram = bytes(st["ram"])
        if len(ram) != len(self.ram):
            raise ValueError(f"CMOS RAM of {len(ram)} bytes, expected {len(self.ram)}")
        self.index = int(st["index"])
        self.ram[:] = ram
        self.offset = st["offset"]
        self.pending = {int(k): v for k, v in st["pending"].items()}

    def register(self, bus) -> None:
        bus.add_ports(INDEX_PORT, 2, self.pio)

    # -- the clock as the guest sees it ---------------------------------------------------

    def _encode(self, reg: int, value: int) -> int:
        b = self.ram[STATUS_B]
        if reg == HOURS and not b & B_24H:
            pm = value >= 12
            value = value % 12 or 12
            return (value if b & B_DM_BINARY else _bcd(value)) | (HOUR_PM if pm else 0)
        return value if b & B_DM_BINARY else _bcd(value)

    def _decode(self, reg: int, raw: int) -> int:
        b = self.ram[STATUS_B]
        pm = False
        if reg == HOURS and not b & B_24H:
            pm, raw = bool(raw & HOUR_PM), raw & ~HOUR_PM
        value = raw if b & B_DM_BINARY else _from_bcd(raw)
        if reg == HOURS and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def _fields(self) -> dict:
        t = time.gmtime(int(self.now()) + self.offset)
        return {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}

    def _set_clock(self) -> None:
        """B.SET was cleared: the written registers become the guest's time."""
        if not self.pending:
            return
        f = self._fields()
        f.update({r: self._decode(r, v) for r, v in self.pending.items()})
        self.pending = {}
        try:
            wanted = calendar.timegm((f[CENTURY] * 100 + f[YEAR], f[MONTH], f[DAY], f[HOURS], f[MINUTES],
                                      f[SECONDS], 0, 0, 0))
        except (ValueError, OverflowError):
            return                   # an impossible date: keep the clock as it was
        self.offset = wanted - int(self.now())

    # -- registers ---------------------------------------------------------------------------

    def read_reg(self, reg: int) -> int:
        if reg in TIME_REGS:
            if reg in self.pending:
                return self.pending[reg]
            return self._encode(reg, self._fields()[reg])
        value = self.ram[reg]
        if reg == STATUS_C:
            self.ram[STATUS_C] = 0           # read-to-clear (nothing ever sets it)
        return value

    def write_reg(self, reg: int, value: int) -> None:
        if reg in TIME_REGS:
            self.pending[reg] = value
            if not self.ram[STATUS_B] & B_SET:
                self._set_clock()
        elif reg == STATUS_A:
            self.ram[STATUS_A] = value & 0x7F  # UIP is read-only
        elif reg == STATUS_B:
            was_set = self.ram[STATUS_B] & B_SET
            self.ram[STATUS_B] = value
            if was_set and not value & B_SET:
                self._set_clock()
        elif reg in (STATUS_C, STATUS_D):
            pass                             # read-only
        else:
            self.ram[reg] = value

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        out = 0
        for k in range(size):            # a wide access acts on consecutive ports
            p = port + k
            byte = (value >> (8 * k)) & 0xFF
            if p == INDEX_PORT:
                if is_write:
                    self.index = byte & ~NMI_DISABLE & 0x7F
                else:
                    out |= self.index << (8 * k)
            elif p == DATA_PORT:
                if is_write:
                    self.write_reg(self.index, byte)
                else:
                    out |= self.read_reg(self.index) << (8 * k)
            elif not is_write:
                out |= 0xFF << (8 * k)       # past 0x71: nothing there
        return out


__all__ = ["CmosRtc", "INDEX_PORT", "DATA_PORT"]
