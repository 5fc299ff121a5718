"""The CMOS clock at 0x70/0x71, read and set the way Linux's mc146818 code does."""
import calendar
import time

import pytest

from lguest_jit.hw.cmos import (B_24H, B_DM_BINARY, B_SET, DATA_PORT, INDEX_PORT, STATUS_A, STATUS_B, STATUS_C,
                                STATUS_D, CmosRtc)

T = calendar.timegm((2026, 11, 29, 21, 7, 5, 0, 0, 0))   # a Sunday, 9 pm


def rd(rtc, reg):
    rtc.pio(INDEX_PORT, 1, True, reg)
    return rtc.pio(DATA_PORT, 1, False, 0)


def wr(rtc, reg, value):
    rtc.pio(INDEX_PORT, 1, True, reg)
    rtc.pio(DATA_PORT, 1, True, value)


@pytest.fixture
def rtc():
    return CmosRtc(now=lambda: T + 0.4)


def test_bcd_24h_time_and_date(rtc):
    assert rd(rtc, STATUS_A) & 0x80 == 0                   # no update in progress: no wait
    assert rd(rtc, STATUS_D) & 0x80                        # valid
    assert [rd(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x05, 0x07, 0x21, 1, 0x29, 0x11, 0x26, 0x20]


def test_binary_and_12_hour_modes(rtc):
    wr(rtc, STATUS_B, B_DM_BINARY)                         # binary, 12-hour
    assert rd(rtc, 4) == 0x80 | 9                          # 9 pm
    assert rd(rtc, 9) == 26 and rd(rtc, 7) == 29
    wr(rtc, STATUS_B, B_24H)                               # BCD, 12-hour
    wr(rtc, STATUS_B, 0)
    assert rd(rtc, 4) == 0x80 | 0x09


def test_index_ignores_the_nmi_bit_and_ram_is_ram(rtc):
    rtc.pio(INDEX_PORT, 1, True, 0x80 | 0x40)
    rtc.pio(DATA_PORT, 1, True, 0x5A)
    assert rd(rtc, 0x40) == 0x5A
    assert rtc.pio(INDEX_PORT, 1, False, 0) == 0x40


def test_status_registers_are_guarded(rtc):
    wr(rtc, STATUS_A, 0xFF)
    assert rd(rtc, STATUS_A) == 0x7F                       # UIP stays clear
    wr(rtc, STATUS_D, 0)
    assert rd(rtc, STATUS_D) & 0x80
    assert rd(rtc, STATUS_C) == 0


def test_guest_sets_its_clock_without_touching_the_host(rtc):
    host = time.time()
    wr(rtc, STATUS_B, B_SET | B_24H)
    for reg, v in ((0, 0x30), (2, 0x15), (4, 0x08), (7, 0x01), (8, 0x01), (9, 0x30)):
        wr(rtc, reg, v)
    assert rd(rtc, 2) == 0x15                              # held while SET is on
    wr(rtc, STATUS_B, B_24H)
    assert rtc.offset == calendar.timegm((2030, 1, 1, 8, 15, 30, 0, 0, 0)) - int(T + 0.4)
    assert [rd(rtc, r) for r in (9, 8, 7, 4, 2, 0)] == [0x30, 0x01, 0x01, 0x08, 0x15, 0x30]
    assert abs(time.time() - host) < 60


def test_an_impossible_date_is_ignored(rtc):
    wr(rtc, STATUS_B, B_SET | B_24H)
    wr(rtc, 8, 0x13)                                       # month 13
    wr(rtc, STATUS_B, B_24H)
    assert rtc.offset == 0 and rd(rtc, 8) == 0x11


def test_wide_access_and_ports_past_the_clock(rtc):
    assert rtc.pio(INDEX_PORT, 2, True, (0x00 << 8) | 0x0D) == 0  # index 0x0D then data write (ignored: D is RO)
    assert rtc.pio(DATA_PORT, 2, False, 0) == 0xFF00 | 0x80       # D, then nothing at 0x72
