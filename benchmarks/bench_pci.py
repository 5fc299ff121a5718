"""PCI dispatch throughput: config-space and BAR0 accesses through the
same compiled exit handler the vCPU loop uses.

A compiled driver (``_drive``) fills a kvm_run-shaped page with one exit
at a time -- a port-I/O exit for conf1, an MMIO exit for BAR0 -- and calls
``vcpu.handle_exit`` on the bus's tables, exactly what the vCPU loop
(``lguest_jit.vcpu``) does after each KVM_RUN.  Under ``NUMBA_DISABLE_JIT=1`` the same driver and
handler run as plain Python: the ratio is what compiling the dispatch buys.

* ``config_accesses_per_s``: one Linux ``pci_read_config_dword``/``word``
  -- an ``outl`` to 0xCF8 and an ``in`` from 0xCFC+n -- over a mix of
  header and capability offsets (two exits per access).
* ``config_writes_per_s``: the same with a masked write without a Python
  hook (interrupt line, latency timer, the PCI_CFG window's offset field;
  COMMAND and BAR0 writes run a Python hook and are not in the mix).
* ``common_cfg_accesses_per_s``: common-config fields of a live device
  (queue_select write, queue_size / queue_enable / device_status /
  config_generation / num_queues reads).
* ``notify_per_s``: a queue notification write (the eventfd write included).
* ``bus_pio_per_s``: ``bus.pio`` from Python (what the lguest backend and
  the tests call): a thin wrapper over the same dispatch.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

from lguest_jit import pci, testing, vcpu
from lguest_jit.hw.kvm import (AS_FIELDS, KVM_EXIT_IO, KVM_EXIT_MMIO, RUN_EXIT_REASON, RUN_IO_COUNT,
                               RUN_IO_DATA_OFFSET, RUN_IO_DIRECTION, RUN_IO_PORT, RUN_IO_SIZE, RUN_MMIO_DATA,
                               RUN_MMIO_IS_WRITE, RUN_MMIO_LEN, RUN_MMIO_PHYS)
from lguest_jit.hw.memory import GuestMemory, st_u8, st_u16, st_u32, st_u64

from .common import rates, report, side, min_time_for

IO_DATA = 0x800           # where the fake page keeps string-I/O data, as KVM does past the header
IO, MMIO = 0, 1


@njit(nogil=True, cache=True, _nrt=False)     # as vcpu._vcpu_loop: the same compiled code per exit
def _drive(run, tb, ctl, ast, pend, script, n):
    """n exits from the rows of ``script`` (kind, port/address, size,
    is_write, value), in turn; each goes through vcpu.handle_exit.  Returns
    how many were handled before one needed Python (n when none did)."""
    conf, space, ports, kstate, page_slot, regs, bytes_, msix, notify_fd, port_counts, mmio_counts = tb
    k = script.shape[0]
    for i in range(n):
        kind, where, size, is_write, value = script[i % k]
        if kind == IO:
            st_u32(run, RUN_EXIT_REASON, KVM_EXIT_IO)
            st_u8(run, RUN_IO_DIRECTION, is_write)
            st_u8(run, RUN_IO_SIZE, size)
            st_u16(run, RUN_IO_PORT, where)
            st_u32(run, RUN_IO_COUNT, 1)
            st_u64(run, RUN_IO_DATA_OFFSET, IO_DATA)
            st_u64(run, IO_DATA, value)
        else:
            st_u32(run, RUN_EXIT_REASON, KVM_EXIT_MMIO)
            st_u64(run, RUN_MMIO_PHYS, where)
            st_u32(run, RUN_MMIO_LEN, size)
            st_u8(run, RUN_MMIO_IS_WRITE, is_write)
            st_u64(run, RUN_MMIO_DATA, value)
        if vcpu.handle_exit(run, ctl, ast, pend, conf, space, ports, kstate, page_slot, regs, bytes_, msix,
                            notify_fd, port_counts, mmio_counts) != 0:
            return i
    return n


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
    run = np.zeros(4096, dtype=np.uint8)
    ctl = np.zeros(vcpu.V_FIELDS, dtype=np.int64)
    ast = np.zeros(AS_FIELDS, dtype=np.int64)          # the assist's state (no assist exits here)
    pend = np.zeros(pci.PD_FIELDS, dtype=np.int64)
    tb = bus.tables
    slot = t.slot
    reads = []
    for off, size in ((0x00, 4), (0x04, 2), (0x0E, 1), (0x10, 4), (0x34, 1), (0x40, 2), (0x48, 4), (0x3D, 1)):
        reads += [(IO, pci.CONFIG_ADDRESS, 4, 1, testing.conf1_address(slot, off)), (IO, 0xCFC + (off & 3), size, 0, 0)]
    writes = []
    for off, size, v in ((0x3C, 1, t.irq_line), (0x0D, 1, 0x40), (t.cfg_window + 8, 4, 0)):
        writes += [(IO, pci.CONFIG_ADDRESS, 4, 1, testing.conf1_address(slot, off)), (IO, 0xCFC + (off & 3), size, 1, v)]
    base = t.bar0
    common = [(MMIO, base + 0x16, 2, 1, 1), (MMIO, base + 0x18, 2, 0, 0), (MMIO, base + 0x1C, 2, 0, 0),
              (MMIO, base + 0x14, 1, 0, 0), (MMIO, base + 0x15, 1, 0, 0), (MMIO, base + 0x12, 2, 0, 0)]
    fd = t.notify_fds[0]
    notify = [(MMIO, t.notify_gpa(0), 2, 1, 0)]

    def driver(rows, per):
        script = np.array(rows, dtype=np.int64)

        def go(n):
            todo = n * per
            done = _drive(run, tb, ctl, ast, pend, script, todo)
            if done != todo:
                raise RuntimeError(f"bench pci: exit {done} needed Python ({script[done % len(script)]})")
        return go

    notify_exits = driver(notify, 1)

    def notify_and_drain(n):
        notify_exits(n)
        os.eventfd_read(fd)          # keep the eventfd counter far from its limit

    def bus_pio(n):
        pio = bus.pio
        for i in range(n):
            pio(0xCF8, 4, True, reads[2 * (i % 8)][4])
            pio(0xCFC, 4, False, 0)

    try:
        return rates(f"bench pci: {side()}", {
            "config_accesses_per_s": driver(reads, 2), "config_writes_per_s": driver(writes, 2),
            "common_cfg_accesses_per_s": driver(common, 1), "notify_per_s": notify_and_drain,
            "bus_pio_per_s": bus_pio,
        }, t_min)
    finally:
        bus.close()
        gm.close()


def run(quick: bool = False) -> dict:
    return report("pci", "accesses per second through the vCPU loop's exit handler, one thread", "benchmarks.bench_pci",
                  quick, measure)
