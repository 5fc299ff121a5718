"""PCI bus throughput: config-space and BAR0 accesses through the bus.

Everything goes through the public entry points a hypervisor backend uses
(``bus.pio`` / ``bus.mmio``), so the figures include dispatch, locking and
the kernels:

* ``config_accesses_per_s``: one Linux ``pci_read_config_dword``/``word``
  — an ``outl`` to 0xCF8 and an ``in`` from 0xCFC+n — over a mix of header
  and capability offsets.
* ``config_writes_per_s``: the same with a masked write (COMMAND, the
  interrupt line, the PCI_CFG window's offset field).
* ``common_cfg_accesses_per_s``: reads and writes of common-config fields of
  a live device (queue_select write, queue_size / queue_enable /
  device_status / config_generation reads).
* ``notify_per_s``: a queue notification write (eventfd write included).
"""
from __future__ import annotations

import os

import numpy as np

from lguest_jit import pci
from lguest_jit.hw.memory import GuestMemory

from .common import rates, report, side, min_time_for


class _Dev(pci.VirtioDevice):
    device_type = 2
    name = "bench"
    queue_max_sizes = (128, 128)
    config = np.zeros(16, dtype=np.uint8)


def _machine():
    gm = GuestMemory(1 << 20)
    bus = pci.Bus(gm)
    t = bus.add_device(_Dev())
    m = lambda off, size, v=None: bus.mmio(t.bar0 + off, size, v is not None, v or 0)
    m(0x14, 1, 0)
    m(0x14, 1, 1)
    m(0x14, 1, 3)
    m(0x08, 4, 1)
    m(0x0C, 4, 1)
    m(0x14, 1, 11)
    m(0x14, 1)
    for q in range(2):
        m(0x16, 2, q)
        m(0x18, 2, 16)
        m(0x20, 8, 0x10000 + 0x1000 * q)
        m(0x28, 8, 0x10400 + 0x1000 * q)
        m(0x30, 8, 0x10800 + 0x1000 * q)
        m(0x1C, 2, 1)
    m(0x14, 1, 15)
    assert t.status == 15
    return gm, bus, t


def measure(quick: bool = False) -> dict:
    t_min = min_time_for(quick, 0.25)
    gm, bus, t = _machine()
    pio, mmio = bus.pio, bus.mmio
    slot = t.slot
    reads = [(pci.conf1_address(slot, off), 0xCFC + (off & 3), size)
             for off, size in ((0x00, 4), (0x04, 2), (0x0E, 1), (0x10, 4), (0x34, 1), (0x40, 2), (0x48, 4),
                               (0x3D, 1))]
    writes = [(pci.conf1_address(slot, off), 0xCFC + (off & 3), size, v)
              for off, size, v in ((0x04, 2, 0x6), (0x3C, 1, t.irq_line), (t.cfg_window + 8, 4, 0))]

    def config_reads(n):
        k = len(reads)
        for i in range(n):
            addr, port, size = reads[i % k]
            pio(0xCF8, 4, True, addr)
            pio(port, size, False, 0)

    def config_writes(n):
        k = len(writes)
        for i in range(n):
            addr, port, size, v = writes[i % k]
            pio(0xCF8, 4, True, addr)
            pio(port, size, True, v)

    base = t.bar0
    common = [(base + 0x16, 2, True, 1), (base + 0x18, 2, False, 0), (base + 0x1C, 2, False, 0),
              (base + 0x14, 1, False, 0), (base + 0x15, 1, False, 0), (base + 0x12, 2, False, 0)]

    def common_cfg(n):
        k = len(common)
        for i in range(n):
            a, s, w, v = common[i % k]
            mmio(a, s, w, v)

    fd = t.notify_fds[0]
    naddr = t.notify_gpa(0)

    def notify(n):
        for _ in range(n):
            mmio(naddr, 2, True, 0)
        # keep the eventfd counter far from its limit
        os.eventfd_read(fd)

    try:
        return rates(f"bench pci: {side()}", {
            "config_accesses_per_s": config_reads, "config_writes_per_s": config_writes,
            "common_cfg_accesses_per_s": common_cfg, "notify_per_s": notify,
        }, t_min)
    finally:
        bus.close()
        gm.close()


def run(quick: bool = False) -> dict:
    return report("pci", "accesses per second through bus.pio/bus.mmio, one thread", "benchmarks.bench_pci",
                  quick, measure)
