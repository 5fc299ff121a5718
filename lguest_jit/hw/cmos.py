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

State lives in an int64 array (the 128 bytes, the index, the offset and
the registers held while B.SET is on) and one kernel, ``cmos_access``,
does every access: the compiled vCPU loop (pci's dispatch) and the Python
``CmosRtc.pio`` share it.  Dates are computed with the proleptic Gregorian
day count (as ``calendar.timegm``/``time.gmtime`` do), in the kernel.

Register numbers follow the MC146818 datasheet (Linux: include/linux/mc146818rtc.h).
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from .fields import Blob, Int, List, Record, blob, check

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



# State array layout
C_RAM = 0              # 128 bytes of clock RAM, one per field
C_INDEX = 128
C_OFFSET = 129         # guest clock minus host clock, seconds
C_PENDING = 130        # 128 fields: a time register written while B.SET is on, -1 if not
C_FIELDS = 258

REG_NAMES = ("index", "data")


@njit(nogil=True, cache=True)
def _is_time_reg(reg):
    return (reg == SECONDS or reg == MINUTES or reg == HOURS or reg == WEEKDAY or reg == DAY or reg == MONTH
            or reg == YEAR or reg == CENTURY)


@njit(nogil=True, cache=True)
def _bcd(v):
    return (v // 10) << 4 | v % 10


@njit(nogil=True, cache=True)
def _from_bcd(v):
    return (v >> 4) * 10 + (v & 0xF)


@njit(nogil=True, cache=True)
def _days_from_civil(y, m, d):
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    mp = m - 3 if m > 2 else m + 9
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@njit(nogil=True, cache=True)
def _field(secs, reg):
    """Register ``reg``'s value (plain number) at UTC ``secs``."""
    days = secs // 86400
    rem = secs - days * 86400
    if reg == SECONDS:
        return rem % 60
    if reg == MINUTES:
        return (rem // 60) % 60
    if reg == HOURS:
        return rem // 3600
    if reg == WEEKDAY:
        return ((days + 3) % 7 + 1) % 7 + 1      # 1970-01-01 was a Thursday; Sunday is 1
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    if reg == DAY:
        return doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    if reg == MONTH:
        return month
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    if reg == YEAR:
        return year % 100
    return year // 100                           # CENTURY


@njit(nogil=True, cache=True)
def _encode(st, reg, value):
    b = st[C_RAM + STATUS_B]
    if reg == HOURS and (b & B_24H) == 0:
        pm = value >= 12
        value = value % 12
        if value == 0:
            value = 12
        return (value if (b & B_DM_BINARY) else _bcd(value)) | (HOUR_PM if pm else 0)
    return value if (b & B_DM_BINARY) else _bcd(value)


@njit(nogil=True, cache=True)
def _decode(st, reg, raw):
    b = st[C_RAM + STATUS_B]
    pm = False
    h12 = reg == HOURS and (b & B_24H) == 0
    if h12:
        pm = (raw & HOUR_PM) != 0
        raw = raw & ~HOUR_PM & 0xFF
    value = raw if (b & B_DM_BINARY) else _from_bcd(raw)
    if h12:
        value = value % 12 + (12 if pm else 0)
    return value


@njit(nogil=True, cache=True)
def _set_clock(st, now):
    """B.SET was cleared: the written registers become the guest's time."""
    any_pending = False
    for r in range(128):
        if st[C_PENDING + r] >= 0:
            any_pending = True
    if not any_pending:
        return
    # Scalars, not an array: this runs inside the vCPU loop, which is
    # compiled without the runtime that allocations need.
    secs = now + st[C_OFFSET]
    second = _written_or_now(st, SECONDS, secs)
    minute = _written_or_now(st, MINUTES, secs)
    hour = _written_or_now(st, HOURS, secs)
    day = _written_or_now(st, DAY, secs)
    month = _written_or_now(st, MONTH, secs)
    year = _written_or_now(st, CENTURY, secs) * 100 + _written_or_now(st, YEAR, secs)
    for r in range(128):
        st[C_PENDING + r] = -1
    if month < 1 or month > 12 or year < 1 or year > 9999:
        return                   # an impossible date: keep the clock as it was
    wanted = (_days_from_civil(year, month, 1) + day - 1) * 86400 + hour * 3600 + minute * 60 + second
    st[C_OFFSET] = wanted - now


@njit(nogil=True, cache=True)
def _written_or_now(st, reg, secs):
    """Time register ``reg``: what the guest wrote while B.SET was set, else
    its value at guest time ``secs``."""
    raw = st[C_PENDING + reg]
    return _decode(st, reg, raw) if raw >= 0 else _field(secs, reg)


@njit(nogil=True, cache=True)
def _read_reg(st, reg, now):
    if _is_time_reg(reg):
        if st[C_PENDING + reg] >= 0:
            return st[C_PENDING + reg]
        return _encode(st, reg, _field(now + st[C_OFFSET], reg))
    value = st[C_RAM + reg]
    if reg == STATUS_C:
        st[C_RAM + STATUS_C] = 0           # read-to-clear (nothing ever sets it)
    return value


@njit(nogil=True, cache=True)
def _write_reg(st, reg, value, now):
    if _is_time_reg(reg):
        st[C_PENDING + reg] = value
        if (st[C_RAM + STATUS_B] & B_SET) == 0:
            _set_clock(st, now)
    elif reg == STATUS_A:
        st[C_RAM + STATUS_A] = value & 0x7F  # UIP is read-only
    elif reg == STATUS_B:
        was_set = st[C_RAM + STATUS_B] & B_SET
        st[C_RAM + STATUS_B] = value
        if was_set and (value & B_SET) == 0:
            _set_clock(st, now)
    elif reg == STATUS_C or reg == STATUS_D:
        pass                                 # read-only
    else:
        st[C_RAM + reg] = value


@njit(nogil=True, cache=True)
def cmos_access(st, port, size, is_write, value, now):
    """One access at ``port`` (0x70 index, 0x71 data; a wide access acts on
    consecutive ports, past 0x71 nothing answers) at host UTC second
    ``now``.  Returns the value read (0 for writes)."""
    out = 0
    for k in range(size):
        p = port + k
        byte = (value >> (8 * k)) & 0xFF
        if p == INDEX_PORT:
            if is_write:
                st[C_INDEX] = byte & ~NMI_DISABLE & 0x7F
            else:
                out |= st[C_INDEX] << (8 * k)
        elif p == DATA_PORT:
            if is_write:
                _write_reg(st, st[C_INDEX], byte, now)
            else:
                out |= _read_reg(st, st[C_INDEX], now) << (8 * k)
        elif not is_write:
            out |= 0xFF << (8 * k)       # past 0x71: nothing there
    return out


class CmosRtc:
    """``pio(port, size, is_write, value)`` is the bus handler; ``now()``
    returns host UTC seconds (a parameter for tests; with the default the
    bus's compiled dispatch serves the ports, reading the clock itself)."""

    def __init__(self, now=time.time):
        self.now = now
        self.state = np.zeros(C_FIELDS, dtype=np.int64)
        self.state[C_PENDING:] = -1
        self.state[C_RAM + STATUS_A] = A_DIVIDER_32KHZ_1024HZ
        self.state[C_RAM + STATUS_B] = B_24H           # BCD and 24-hour, as PC firmware leaves it
        self.state[C_RAM + STATUS_D] = D_VRT

    @property
    def offset(self) -> int:
        """Guest clock minus host clock, seconds."""
        return int(self.state[C_OFFSET])

    # A snapshot's fields: index, RAM, pending time writes (-1: none) and the
    # guest's clock offset, relative to host time, so a restored guest's
    # wall clock reads the host's time as before.
    STATE = Record({"index": Int(0, 127), "ram": Blob(128), "pending": List(Int(-1, 0xFF), 128, min_len=128),
                    "offset_s": Int(-(2**40) + 1, 2**40 - 1)})

    def save_state(self) -> dict:
        st = self.state
        return {"index": int(st[C_INDEX]), "ram": blob(bytes(int(v) for v in st[C_RAM:C_RAM + 128])),
                "pending": [int(v) for v in st[C_PENDING:C_PENDING + 128]], "offset_s": int(st[C_OFFSET])}

    def load_state(self, st: dict) -> None:
        """Put back ``save_state()``, every field checked (``STATE``)."""
        st = check(self.STATE, st, "cmos")
        self.state[C_INDEX] = st["index"]
        self.state[C_RAM:C_RAM + 128] = np.frombuffer(st["ram"], dtype=np.uint8)
        self.state[C_PENDING:C_PENDING + 128] = st["pending"]
        self.state[C_OFFSET] = st["offset_s"]

    def register(self, bus) -> None:
        add = getattr(bus, "add_kernel_ports", None)
        if add is not None and self.now is time.time:
            self.state = add(INDEX_PORT, 2, self.pio, "cmos", self.state)    # the bus holds the state now
        else:
            bus.add_ports(INDEX_PORT, 2, self.pio)

    def pio(self, port: int, size: int, is_write: bool, value: int) -> int:
        return int(cmos_access(self.state, port, size, is_write, value, int(self.now())))


__all__ = ["CmosRtc", "INDEX_PORT", "DATA_PORT", "cmos_access", "REG_NAMES"]
