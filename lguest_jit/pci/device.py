"""The device interface: what a virtio device gives the transport.

Device interface (``lguest_jit.devices`` subclass :class:`VirtioDevice`)
=======================================================================
``device_type``, ``kind``, ``name``, ``pci_class``, ``queue_max_sizes``,
``features``, ``config`` (uint8 array), ``config_write(offset, size, value)
-> bool``, ``activate(ctx: QueueContext)``, ``reset()``, and its own saved
state: ``STATE`` (hw.fields), ``save_state()``, ``load_state(state)``.
See the class docstrings.
A device that changes ``config`` calls ``transport.config_changed()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..hw.fields import Record, check
from ..hw.memory import GuestMemory


@dataclass
class QueueContext:
    """What a device gets at DRIVER_OK (see VirtioDevice.activate)."""
    mem: GuestMemory
    features: int                      # negotiated, all 64 bits
    queues: list                       # vring state array per queue, None if not enabled
    notify_fds: list                   # one eventfd per queue (blocking)
    irq_fd: int                        # write 1 to raise the interrupt
    isr: np.ndarray                    # uint8[1]; OR 1 (used buffer) or 2 (config) into it first
    driver_error: Callable[[int, str], None]   # (queue_index, message): applies the policy
    name: str = ""
    # The device's MSI-X state (Bus.msix[slot]); queue threads pass it to
    # vring as ``irq`` instead of irq_fd, so each interrupt goes to the
    # queue's vector while MSI-X is enabled (INTx otherwise).
    msix: Optional[np.ndarray] = None


class VirtioDevice:
    """What a device gives the transport.  Subclasses set the attributes and
    override ``activate``/``reset`` (and ``config_write`` if any config field
    is writable).

    ``device_type``: virtio device id (1 net, 2 block, 3 console, 4 rng).
    ``queue_max_sizes``: one maximum (a power of two, <= 32768) per queue.
    ``features``: offered feature bits; the transport adds VIRTIO_F_VERSION_1.
    ``config``: uint8 array, the device-specific configuration (empty: no
    DEVICE_CFG capability).  After changing it at run time, call
    ``self.transport.config_changed()``.
    """
    device_type: int = 0
    kind: str = "virtio"             # the device registry's name (lguest_jit.devices.DEVICES)
    name: str = "virtio"
    pci_class: tuple = (0xFF, 0x00)  # PCI class and subclass in config space
    queue_max_sizes: tuple = ()
    features: int = 0
    config: np.ndarray = np.zeros(0, dtype=np.uint8)
    transport: "Transport" = None
    STATE = Record({})               # the fields save_state() returns (hw.fields)

    def save_state(self) -> dict:
        """The device's own state beyond the transport's, as ``STATE``'s
        named fields (a snapshot; the device is paused)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Put back ``save_state()``, every field read through ``STATE``."""
        check(self.STATE, state, self.name)


    def config_write(self, offset: int, size: int, value: int) -> bool:
        """The driver wrote ``size`` bytes of device config at ``offset``.
        Return False when the field is read-only (a driver error)."""
        return False

    def activate(self, ctx: QueueContext) -> None:
        """DRIVER_OK: start serving the enabled queues."""

    def reset(self) -> None:
        """Stop and join the queue threads; forget negotiated state."""


class IrqAllocator:
    """Interrupt lines for one machine.  Lines used by legacy PC devices
    (timer 0, keyboard 1, cascade 2, COM1 4, RTC 8, mouse 12, FPU 13, IDE 14)
    are never handed out; when the free ones run out, lines are shared
    (PCI INTx is level-triggered and shareable)."""

    ORDER = (5, 9, 10, 11, 3, 6, 7, 15)

    def __init__(self, order=ORDER):
        self._order = tuple(order)
        self._next = 0

    def allocate(self) -> int:
        line = self._order[self._next % len(self._order)]
        self._next += 1
        return line
