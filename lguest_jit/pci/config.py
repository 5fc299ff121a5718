"""PCI configuration space: constants, the config-space builder and its
permission masks, the conf1 kernel, and the host bridge.

Config space is virtualized the vfio way: ``bus.space[slot, plane, offset]``
holds per byte the value (``P_CFG``), the writable bits (``P_WMASK``), which
handler has behaviour there (``P_HOOK``: BAR0, COMMAND, pci_cfg_data) and
the region (``P_REGION``: header or capability number, so accesses are split
into aligned chunks that never straddle a capability; an empty slot is all
"unused").  The tables are built per region when a device is added.  One
kernel, ``conf1_access``, handles both conf1 ports; Python runs only the hooks.
BAR sizing needs no handler: BAR0's writable bits are its size mask, so
writing all-ones reads back the mask; unimplemented BARs and the ROM BAR
have no writable bits and stay 0.  BAR0 decodes wherever the guest puts it,
whatever COMMAND.MEMORY says (lguest's behaviour; Linux never relies on
decode being off).
"""
from __future__ import annotations

from numba import njit

# The one little-endian reader/writer of config spaces and register pages
# (the devices' config writers use it too).
from ..hw.memory import get_le as read_le, put_le as write_le  # noqa: F401


# ---------------------------------------------------------------------------
# PCI constants

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
MAX_SLOTS = 32
PCI_CFG_SPACE_SIZE = 256   # config space of a conventional PCI function

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
# Bits a driver may flip; everything else in COMMAND reads 0.
COMMAND_WRITABLE = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                    | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)
PCI_STATUS_CAP_LIST = 0x10
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
# MSI-X capability (PCI 3.0 §6.8.2): id, next, Message Control, Table
# Offset/BIR, PBA Offset/BIR.
PCI_MSIX_FLAGS = 2
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_CAP_LEN = 12
PCI_MSIX_FLAGS_QSIZE = 0x07FF    # table size - 1, read-only
PCI_MSIX_FLAGS_MASKALL = 0x4000  # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000
MSIX_ENTRY_SIZE = 16             # address lo, address hi, data, vector control

# Host bridge identity: Red Hat's generic host bridge id, which no Linux
# quirk matches (an Intel id would pull in chipset quirks).
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008


# ---------------------------------------------------------------------------
# Config space kernel

C_ADDR = 0        # the CONFIG_ADDRESS register
C_FIELDS = 2

H_NONE = 0
H_BAR0 = 1
H_COMMAND = 2
H_CFG_DATA = 3    # pci_cfg_data: reads and writes go through to BAR0
H_MSIX = 4        # MSI-X Message Control: Enable, Function Mask

REGION_UNUSED = 0xFF

# Planes of the per-bus config array space[slot, plane, offset]
P_CFG = 0         # current values
P_WMASK = 1       # writable bits
P_HOOK = 2        # H_* handler id
P_REGION = 3      # 0 header, n capability n, REGION_UNUSED; an empty slot is all unused
P_PLANES = 4


@njit(nogil=True, cache=True, inline='always')
def size_mask(size):
    if size >= 4:
        return 0xFFFFFFFF
    return (1 << (8 * size)) - 1


@njit(nogil=True, cache=True, inline='always')
def conf1_access(conf, space, port, size, is_write, value, hooks_done):
    """One access to the conf1 ports; the caller guarantees the access lies
    inside 0xCF8-0xCFB or 0xCFC-0xCFF.  ``space[slot, P_*, offset]`` holds
    the four per-byte tables.  Returns (result, hooks): ``hooks`` is a bit
    set of H_* handlers for the bytes written.  A read touching pci_cfg_data
    returns hooks=1<<H_CFG_DATA and does nothing unless ``hooks_done`` (the
    caller performs the window read and calls again)."""
    smask = size_mask(size)
    if port < CONFIG_DATA:
        shift = 8 * (port - CONFIG_ADDRESS)
        if is_write:
            m = smask << shift
            conf[C_ADDR] = (conf[C_ADDR] & ~m & 0xFFFFFFFF) | ((value << shift) & m)
            return 0, 0
        return (conf[C_ADDR] >> shift) & smask, 0
    a = conf[C_ADDR]
    ones = 0 if is_write else smask
    # Configuration cycles need the enable bit, bus 0 and function 0.
    if (a & 0x80000000) == 0 or ((a >> 16) & 0xFF) != 0 or ((a >> 8) & 7) != 0:
        return ones, 0
    slot = (a >> 11) & 31
    if space[slot, P_REGION, 0] != 0:      # no header: empty slot
        return ones, 0
    base = (a & 0xFC) + (port - CONFIG_DATA)
    if not is_write and not hooks_done:
        for i in range(size):
            if space[slot, P_HOOK, base + i] == H_CFG_DATA:
                return 0, 1 << H_CFG_DATA
    result = 0
    hooks = 0
    done = 0
    while done < size:
        pos = base + done
        # Chunk: no further than the dword end or the end of this region,
        # then the largest naturally aligned size that fits (vfio).
        n = 1
        r = space[slot, P_REGION, pos]
        while n < size - done and (pos + n) % 4 != 0 and space[slot, P_REGION, pos + n] == r:
            n += 1
        if n >= 4 and pos % 4 == 0:
            n = 4
        elif n >= 2 and pos % 2 == 0:
            n = 2
        else:
            n = 1
        for i in range(n):
            b = pos + i
            if is_write:
                w = int(space[slot, P_WMASK, b])
                if w != 0:
                    v = (value >> (8 * (done + i))) & 0xFF
                    space[slot, P_CFG, b] = (int(space[slot, P_CFG, b]) & ~w & 0xFF) | (v & w)
                    h = int(space[slot, P_HOOK, b])
                    if h != 0:
                        hooks |= 1 << h
            else:
                result |= int(space[slot, P_CFG, b]) << (8 * (done + i))
        done += n
    return result, hooks


# ---------------------------------------------------------------------------
# Config space construction (the per-region permission tables)


class ConfigBuilder:
    """Fills one slot's cfg/wmask/hook/region rows region by region."""

    def __init__(self, cfg, wmask, hook, region):
        self.cfg, self.wmask, self.hook, self.region = cfg, wmask, hook, region
        cfg[:] = 0
        wmask[:] = 0
        hook[:] = H_NONE
        region[:] = REGION_UNUSED
        region[:0x40] = 0
        self._caps = []

    def set(self, off, width, val, writable=0, hook=H_NONE):
        write_le(self.cfg, off, width, val)
        write_le(self.wmask, off, width, writable)
        if hook != H_NONE:
            self.hook[off:off + width] = hook

    def header(self, vendor, device, revision, cls, subcls, progif, sub_vendor, sub_device, pin, line,
               bar0_size=0, bar0=0):
        self.set(PCI_VENDOR_ID, 2, vendor)
        self.set(PCI_DEVICE_ID, 2, device)
        self.set(PCI_COMMAND, 2, 0, COMMAND_WRITABLE, H_COMMAND)
        self.set(PCI_STATUS, 2, 0)
        self.set(PCI_REVISION_ID, 1, revision)
        self.set(PCI_CLASS_PROG, 1, progif)
        self.set(PCI_CLASS_DEVICE, 2, (cls << 8) | subcls)
        # Scratch registers Linux may program (pci_set_cacheline_size,
        # pcibios_set_master): harmless to let them stick, as vfio does.
        self.set(PCI_CACHE_LINE_SIZE, 1, 0, 0xFF)
        self.set(PCI_LATENCY_TIMER, 1, 0, 0xFF)
        self.set(PCI_HEADER_TYPE, 1, 0)
        if bar0_size:
            # 32-bit non-prefetchable memory BAR: the writable bits are the
            # address bits, so an all-ones write reads back the size mask.
            self.set(PCI_BASE_ADDRESS_0, 4, bar0, (~(bar0_size - 1)) & 0xFFFFFFFF, H_BAR0)
        # BAR1-5 and the ROM BAR: no writable bits, so they read 0 forever.
        self.set(PCI_SUBSYSTEM_VENDOR_ID, 2, sub_vendor)
        self.set(PCI_SUBSYSTEM_ID, 2, sub_device)
        self.set(PCI_INTERRUPT_LINE, 1, line, 0xFF)
        self.set(PCI_INTERRUPT_PIN, 1, pin)

    def vendor_cap(self, off, cfg_type, bar_off, length, extra=b"", window=False):
        """A virtio vendor capability (struct virtio_pci_cap, §4.1.4) at ``off``."""
        size = 16 + len(extra)
        idx = len(self._caps) + 1
        self.region[off:off + size] = idx
        self.set(off + 0, 1, PCI_CAP_ID_VNDR)
        self.set(off + 2, 1, size)
        self.set(off + 3, 1, cfg_type)
        self.set(off + 4, 1, 0)            # bar
        self.set(off + 8, 4, bar_off)
        self.set(off + 12, 4, length)
        for i, b in enumerate(extra):
            self.cfg[off + 16 + i] = b
        if window:
            # VIRTIO_PCI_CAP_PCI_CFG: the driver programs bar/offset/length
            # and moves data through pci_cfg_data (§4.1.4.7).
            self.wmask[off + 4] = 0xFF
            write_le(self.wmask, off + 8, 4, 0xFFFFFFFF)
            write_le(self.wmask, off + 12, 4, 0xFFFFFFFF)
            write_le(self.wmask, off + 16, 4, 0xFFFFFFFF)
            self.hook[off + 16:off + 20] = H_CFG_DATA
        self._link(off)
        return off + size

    def _link(self, off):
        if self._caps:
            self.cfg[self._caps[-1] + 1] = off      # link from the previous cap
        else:
            self.cfg[PCI_CAPABILITY_LIST] = off
            write_le(self.cfg, PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        self._caps.append(off)

    def msix_cap(self, off, vectors, table_off, pba_off):
        """The MSI-X capability at ``off``: ``vectors`` entries, table and PBA
        at ``table_off``/``pba_off`` in BAR0.  Enable and Function Mask are
        the writable bits (hooked)."""
        self.region[off:off + PCI_MSIX_CAP_LEN] = len(self._caps) + 1
        self.set(off + 0, 1, PCI_CAP_ID_MSIX)
        self.set(off + PCI_MSIX_FLAGS, 2, vectors - 1, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL, H_MSIX)
        self.set(off + PCI_MSIX_TABLE, 4, table_off | 0)      # BIR 0
        self.set(off + PCI_MSIX_PBA, 4, pba_off | 0)
        self._link(off)
        return off + PCI_MSIX_CAP_LEN


# ---------------------------------------------------------------------------
# Host bridge (slot 0): a header with nothing behind its hooks

class HostBridge:
    name = "host bridge"

    def window_read(self):
        pass

    def window_write(self):
        pass

    def command_written(self):
        pass

    def msix_control_written(self):
        pass
