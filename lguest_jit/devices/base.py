"""What every device shares: one service thread per virtqueue.

A device subclasses :class:`Device` and implements ``serve(index, ctx,
stop_fd)``: the body of one queue's thread, normally a single call into the
device's nogil kernel, which loops over ``vring.next_chain`` (wait for a
chain of the right shape), its own I/O and ``vring.complete``, and ends with
``vring.finish``.  It returns only when told to stop (``vring.STOPPED``) or
when the driver broke a rule (a negated ``vring.E_*`` code).  Python starts
the threads at DRIVER_OK, reports errors through the transport's policy, and
on reset or exit stops and joins them.

Stopping: each queue's state array has ``Q_STOP``; setting it and writing the
queue's notification eventfd wakes a thread sleeping in ``vring.next_chain``.
Threads that also sleep in ``poll`` (console input, network receive) include
the device's ``stop_fd`` eventfd in their poll set.

Errors: every driver rule, the ring's and the chain shapes devices require,
has one code in vring's table (``vring.error_message``).

What a device declares (class attributes; the registry in ``__init__`` is
one line per device): ``kind`` (its registry name), ``device_type`` and
``pci_class`` (virtio and PCI identity), ``queue_max_sizes`` and any other
default a knob can change, ``from_options`` (built from a machine
description's options, ``lguest_jit.machine``), and ``STATE`` with
``save_state``/``load_state`` when it has state of its own beyond the
transport's (a snapshot).
"""
from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import ringstate, vring
from ..pci import QueueContext, VirtioDevice
from ..vring import error_message  # noqa: F401 - one table names every rule a device kernel returns


def _default_fatal(message: str) -> None:
    print(f"lguest-jit: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DeviceEnv:
    """What the launcher hands every device it builds: where fatal errors
    go, and the console's output and interrupt hook."""
    on_fatal: Callable[[str], None] = _default_fatal
    console_fd: int = 1
    on_interrupt: Callable[[], None] | None = None
    # The machine's knobs (``knobs.Knobs``): a device whose shape they set
    # (its queue count) reads them in ``from_options``; the rest come
    # through ``apply_knobs``.
    knobs: object = None


class Device(VirtioDevice):
    """Base of the four devices: thread lifecycle, counters, stopping."""

    queue_names: tuple = ()
    # Busy-poll budget before a queue thread sleeps (vring.Q_POLL_SPINS).
    # Worth it where requests come back to back and each wake-up would cost
    # more than the request (block); 0 elsewhere.
    poll_us: float = 0.0
    # One chain in this many is timed for the latency histogram (vring.Q_LAT_EVERY).
    latency_every: int = vring.LAT_EVERY
    # Ring features every device offers (§2.4.5.3, §2.4.7).
    RING_FEATURES = (1 << vring.VIRTIO_RING_F_INDIRECT_DESC) | (1 << vring.VIRTIO_RING_F_EVENT_IDX)

    @classmethod
    def from_options(cls, options: dict, env: DeviceEnv) -> "Device":
        """The device a machine description's entry asks for (``options``
        checked by ``lguest_jit.machine``); a device with options overrides it."""
        return cls(on_fatal=env.on_fatal, **options)

    def __init__(self, on_fatal=None):
        self.on_fatal = on_fatal or _default_fatal
        self._threads: list[threading.Thread] = []
        self._ctx: QueueContext | None = None
        self._stopping = False
        self.stop_fd = -1
        self.thread_ids: dict[str, int] = {}          # live queue threads: name -> native id
        self.thread_times: dict[str, tuple] = {}      # ended ones: name -> (user s, system s)
        # Counters of queues that were stopped (a reset zeroes the live arrays).
        self.totals = np.zeros((len(self.queue_max_sizes), vring.Q_FIELDS), dtype=np.int64)
        self.failed: list[str] = []
        self.layouts: dict[int, str] = {}      # queue index -> "split"/"packed", as last activated (--stats)

    # -- what subclasses implement
    def serve(self, index: int, ctx: QueueContext, stop_fd: int) -> int:
        raise NotImplementedError

    def queue_args(self, ctx: QueueContext, index: int) -> tuple:
        """What every service kernel starts with, for queue ``index``:
        ``(mem, q, iov, notify_fd, isr, irq, scratch)`` (the first seven
        arguments of ``vring.next_chain``).  ``irq`` is the device's MSI-X
        state when the transport gave one (each interrupt then goes to the
        queue's vector while the driver has MSI-X on), else the INTx
        eventfd."""
        irq = ctx.msix if ctx.msix is not None else ctx.irq_fd
        return (ctx.mem.mem, ctx.queues[index], vring.new_iov(self.queue_max_sizes[index]), ctx.notify_fds[index],
                ctx.isr, irq, np.zeros(1, np.uint64))

    def apply_knobs(self, knobs) -> None:
        """Take the tuning knobs (a ``knobs.Knobs``) before the device goes on
        the bus: every queue's maximum size, and the ring features offered
        (packed rings too: the driver that accepts them gets them on every
        queue, vring.setup_queue reads the layout from the features)."""
        if knobs.queue_size:
            self.queue_max_sizes = (knobs.queue_size,) * len(self.queue_max_sizes)
        if not knobs.event_idx:
            self.features &= ~(1 << vring.VIRTIO_RING_F_EVENT_IDX)
        if not knobs.indirect:
            self.features &= ~(1 << vring.VIRTIO_RING_F_INDIRECT_DESC)
        if knobs.packed:
            self.features |= 1 << vring.VIRTIO_F_RING_PACKED

    def queue_poll_us(self, index: int) -> float:
        """Busy-poll budget of queue ``index`` (every queue: ``poll_us``)."""
        return self.poll_us

    def on_activate(self, ctx: QueueContext) -> None:
        """Hook before the threads start (e.g. negotiated-feature set-up)."""

    # -- lifecycle
    def activate(self, ctx: QueueContext) -> None:
        self._ctx = ctx
        self._stopping = False
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.on_activate(ctx)
        for i, q in enumerate(ctx.queues):
            if q is None:
                continue
            q[vring.Q_STOP] = 0
            self.layouts[i] = vring.layout_name(q)
            poll_us = self.queue_poll_us(i)
            vring.set_poll(q, vring.spins_for(poll_us) if poll_us else 0)
            vring.set_latency_sampling(q, self.latency_every)
            name = f"{self.name}:{self.queue_names[i] if i < len(self.queue_names) else i}"
            t = threading.Thread(target=self._thread, args=(i, ctx, name), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def _thread(self, i: int, ctx: QueueContext, name: str) -> None:
        self.thread_ids[name] = threading.get_native_id()
        try:
            code = self.serve(i, ctx, self.stop_fd)
        except BaseException as exc:  # noqa: BLE001 - any death must reach the launcher
            msg = f"{name}: service thread died: {exc!r}"
            self.failed.append(msg)
            self.on_fatal(msg)
            return
        finally:
            # The thread's own CPU time, kept after it is gone (--stats).
            ru = resource.getrusage(resource.RUSAGE_THREAD)
            user, system = self.thread_times.get(name, (0.0, 0.0))
            self.thread_times[name] = (user + ru.ru_utime, system + ru.ru_stime)
            self.thread_ids.pop(name, None)
        if code != vring.STOPPED and code < 0:
            ctx.driver_error(i, error_message(code))

    def _stop_threads(self) -> None:
        """Ask every queue thread to stop and join it.  A thread stops only
        at a chain boundary (next_chain checks Q_STOP before popping; an
        input thread waiting for host data hands its chain back), so the
        queues' state is exactly what the driver sees: nothing in flight."""
        ctx = self._ctx
        self._stopping = True
        for i, q in enumerate(ctx.queues):
            if q is not None:
                q[vring.Q_STOP] = 1
                os.eventfd_write(ctx.notify_fds[i], 1)
        if self.stop_fd >= 0:
            os.eventfd_write(self.stop_fd, 1)
        for t in self._threads:
            t.join()
        self._threads.clear()
        if self.stop_fd >= 0:
            os.close(self.stop_fd)
            self.stop_fd = -1
        self.on_reset()

    def pause(self) -> None:
        """Quiesce for a snapshot: threads stopped and joined, queue state
        kept; ``resume()`` starts them again where they stopped."""
        if self._ctx is None or not self._threads:
            return
        self._stop_threads()

    def resume(self) -> None:
        """Start the queue threads of a paused (or restored) device again."""
        if self._ctx is not None and not self._threads:
            self.activate(self._ctx)

    def reset(self) -> None:
        """Stop every queue thread and join it; keep the counters."""
        ctx = self._ctx
        if ctx is None:
            return
        if self._threads or self.stop_fd >= 0:
            self._stop_threads()
        for i, q in enumerate(ctx.queues):
            if q is not None:
                self.totals[i, vring.Q_N_CHAINS:] += q[vring.Q_N_CHAINS:]
                q[:] = 0
        self._ctx = None

    def on_reset(self) -> None:
        """Hook after the threads stopped."""

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def counters(self) -> dict:
        """Per-queue counters: stopped totals plus the live queues."""
        live = self.totals.copy()
        if self._ctx is not None:
            for i, q in enumerate(self._ctx.queues):
                if q is not None:
                    live[i, vring.Q_N_CHAINS:] += q[vring.Q_N_CHAINS:]
        out = {}
        for i, row in enumerate(live):
            name = self.queue_names[i] if i < len(self.queue_names) else str(i)
            c = ringstate.counters(row)
            out[name] = {"layout": self.layouts.get(i, "split"),
                         "requests": c["chains"], "bytes": c["bytes"], "notifications": c["notifications"],
                         "interrupts": c["interrupts"], "errors": c["errors"], "poll_hits": c["poll_hits"],
                         "latency": {**c["latency"], "sampled_every": self.latency_every}}
        return out
