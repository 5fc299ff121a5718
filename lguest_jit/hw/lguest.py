"""lguest backend: the /dev/lguest protocol as lguest's own launcher speaks it.

With lguest the host kernel runs the guest and the launcher only sees what
the guest could not do by itself.  Everything goes through one file
descriptor (``Documentation/lguest``, ``drivers/lguest/lguest_user.c``):

``write(fd, {LHREQ_INITIALIZE, base, pfn_limit, entry, device_limit})``
    Once, before anything else.  ``base`` is the launcher address of guest
    physical 0 (``GuestMemory.base``), ``pfn_limit`` the number of RAM pages,
    ``entry`` the guest-physical address the guest starts at, and
    ``device_limit`` the page number where the MMIO region ends: a guest
    page fault on a page in ``[pfn_limit, device_limit)`` is not a fault but
    device access, handed to the launcher as trap 14.
``pread(fd, &pending, 12, cpu)``
    Runs the guest until it needs the launcher, then fills ``struct
    lguest_pending {u8 trap; u8 insn[7]; u32 addr;}`` (12 bytes, see
    :data:`PENDING`): trap 13 is a general-protection fault (port I/O, cli)
    with the first 7 bytes of the faulting instruction, trap 14 an MMIO page
    fault with the instruction and the guest-physical address.  The guest
    stays stopped on that instruction until the next ``pread``.
    ``ENOENT``: the guest died; a further read returns its reason.
    ``ERESTART``: the guest asked to reboot (lguest re-executes itself).
``pwrite(fd, {LHREQ_GETREG, offset}, cpu)`` then ``pread(fd, &val, word, cpu)``
    Read a guest register; ``offset`` is the register's offset in the i386
    ``struct user_regs_struct`` (ptrace's layout: :data:`USER_REGS`).
``pwrite(fd, {LHREQ_SETREG, offset, value}, cpu)``
    Write one.
``write(fd, {LHREQ_TRAP, n})``
    Deliver trap ``n`` to the guest after all: what we cannot emulate is
    re-injected, so the guest sees the fault it would have seen on hardware.
``write(fd, {LHREQ_IRQ, line})``
    Raise an interrupt line (any thread may do it).

Requests are arrays of C ``unsigned long``.  :data:`WORD_BYTES` is that size
for this process (``struct.calcsize("L")``): lguest hosts were 32-bit x86
only, where it is 4 and the reference launcher is built ``-m32``; a 64-bit
process (8) could not even express its guest base in 4 bytes, so we pack
with the native size rather than pretend.  The guest is always i386, so
register offsets are always those of the i386 ``user_regs_struct`` and
register values 32 bits.

Emulation follows the reference launcher's ``emulate_insn`` and
``emulate_mmio`` with the exact decoders from :mod:`lguest_jit.hw.decode`
(the reference mis-sizes SIB and mod=00 r/m=101 forms):

* trap 13 from the guest kernel (CS RPL 1): ``cli`` is skipped, ``in``/
  ``out`` go to ``bus.pio`` (``in`` from the PS/2 status port 0x64 reads 1,
  so i8042 probing ends at once) and ``in`` merges into eAX by width;
  anything else, or anything from guest user mode, is re-injected;
* trap 14: ``mov`` to/from memory at an address inside a device's BAR0
  goes to ``bus.mmio``; the register operand is read/merged through
  GETREG/SETREG, AH..BH included; undecodable instructions and addresses
  outside every BAR are re-injected (and logged) -- the reference does the
  same for the latter, and dies with ``errx`` for the former;
* the instruction is then skipped: ``eip += length``.

If the 7 bytes the host copied are too few for the decoder (a ``0x66``
``mov`` with SIB and disp32), the launcher re-reads the instruction from
guest memory at ``eip - GUEST_PAGE_OFFSET`` (lguest guest kernels map RAM
linearly at 0xC0000000) and uses it only if it starts with the host's 7
bytes.

Notifications need nothing here: the bus runs in ``notify_mode="single"``
(one notify register per device, lguest's layout) and a trapped write to it
signals the queue's eventfd.  Interrupts: devices signal
``bus.interrupts()`` eventfds; a relay thread turns each into LHREQ_IRQ,
which is what the reference's ``trigger_irq`` does from the device thread.

The host is any object with ``write(bytes) -> int``, ``pread(size, offset)
-> bytes``, ``pwrite(bytes, offset) -> int`` raising ``OSError`` with the
device's errno, and optionally ``interrupt()`` (make a blocked ``pread``
fail with EINTR soon) and ``close()``.  :class:`DevLguest` is the real
character device; the tests use a simulated one.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import struct
import threading

from .decode import (MAX_INSN_LEN, PS2_STATUS_PORT, decode_mmio, decode_pio, error_message, merge_register,
                     register_operand, unclaimed_port_read)
from .memory import PAGE_SIZE
from .hosts import lguest_available
from .run import ExitStats, RunResult

# ---------------------------------------------------------------------------
# Protocol constants (include/linux/lguest_launcher.h)

LHREQ_INITIALIZE = 0
LHREQ_GETDMA = 1      # removed from the kernel long ago; listed for the numbering
LHREQ_IRQ = 2
LHREQ_BREAK = 3       # likewise gone from PCI-era kernels
LHREQ_EVENTFD = 4     # legacy launcher only
LHREQ_GETREG = 5
LHREQ_SETREG = 6
LHREQ_TRAP = 7

TRAP_GPF = 13          # general protection: port I/O and friends
TRAP_PAGE_FAULT = 14   # page fault in the MMIO region

# struct lguest_pending: u8 trap, u8 insn[7], u32 addr (natural alignment
# puts addr at offset 8: 12 bytes, whatever the word size).
PENDING = struct.Struct("<B7sI")
PENDING_INSN_BYTES = 7

WORD_BYTES = struct.calcsize("L")   # C unsigned long of this process
REASON_BYTES = 1023                 # the reference reads the death reason into char[1024]

# The i386 struct user_regs_struct (<sys/user.h>), 4 bytes per field.
USER_REGS = ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "xds", "xes", "xfs", "xgs",
             "orig_eax", "eip", "xcs", "eflags", "esp", "xss")
REG = {name: 4 * i for i, name in enumerate(USER_REGS)}
USER_REGS_SIZE = 4 * len(USER_REGS)
# x86 register numbers (ModRM reg field order) -> user_regs_struct offsets.
REG_BY_NUMBER = tuple(REG[n] for n in ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"))

GUEST_KERNEL_RPL = 1               # lguest runs the guest kernel in ring 1
GUEST_PAGE_OFFSET = 0xC0000000     # i386 PAGE_OFFSET: guest kernel virtual = physical + this
LGUEST_IRQS = 32                   # the host refuses LHREQ_IRQ lines >= this
DECODE_CACHE_ENTRIES = 4096        # distinct trapping instructions remembered per kind
_U32 = 0xFFFFFFFF


class LguestError(OSError):
    """A /dev/lguest request failed (the message names the request)."""


# The probe lives where the CLI can ask it without loading the engine.
available = lguest_available


def encode_request(req: int, *args: int, word_bytes: int = WORD_BYTES) -> bytes:
    """``{req, args...}`` as an array of little-endian unsigned longs of
    ``word_bytes`` (4 or 8) bytes each."""
    code = {4: "I", 8: "Q"}.get(word_bytes)
    if code is None:
        raise ValueError(f"word size must be 4 or 8 bytes, got {word_bytes}")
    words = (req, *args)
    for w in words:
        if not 0 <= w < 1 << (8 * word_bytes):
            raise ValueError(f"request word {w:#x} does not fit a {word_bytes}-byte unsigned long")
    return struct.pack(f"<{len(words)}{code}", *words)


def decode_request(data: bytes, word_bytes: int = WORD_BYTES) -> tuple:
    """Inverse of :func:`encode_request` (for hosts that receive requests)."""
    if word_bytes not in (4, 8) or len(data) % word_bytes or not data:
        raise ValueError(f"request of {len(data)} bytes is not a whole number of {word_bytes}-byte words")
    return struct.unpack(f"<{len(data) // word_bytes}{'I' if word_bytes == 4 else 'Q'}", data)


# ---------------------------------------------------------------------------
# The real device

_KICK_SIGNAL = signal.SIGRTMIN + 2   # not kvm's (SIGRTMIN+1): this handler raises


class _Kicked(Exception):
    pass


class DevLguest:
    """The /dev/lguest character device behind the host interface.

    ``interrupt()`` can only cut a ``pread`` short in the main thread (Python
    runs signal handlers there and retries interrupted system calls
    elsewhere); from any other thread a stop takes effect at the next trap.
    """

    def __init__(self, path: str = "/dev/lguest"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._reader = None          # thread ident blocked in pread, if main
        if threading.current_thread() is threading.main_thread():
            signal.signal(_KICK_SIGNAL, self._on_kick)

    def _on_kick(self, signum, frame):
        if self._reader is not None:
            raise _Kicked

    def write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def pwrite(self, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def pread(self, size: int, offset: int) -> bytes:
        # Only the run-pread (the size of struct lguest_pending) may be cut
        # short: a register read interrupted half-way would be an error.
        if size == PENDING.size and threading.current_thread() is threading.main_thread():
            self._reader = threading.get_ident()
        try:
            return os.pread(self.fd, size, offset)
        except _Kicked:
            raise InterruptedError(errno.EINTR, "interrupted") from None
        finally:
            self._reader = None

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def interrupt(self) -> None:
        t = self._reader
        if t is not None:
            try:
                signal.pthread_kill(t, _KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------
# The backend


class LguestBackend:
    """One lguest guest (one CPU) over guest memory ``gm`` and PCI ``bus``.

    ``bus`` is used through ``pio``, ``mmio``, ``bar_at`` (which BAR, if
    any, holds an address) and ``interrupts``; this layer knows nothing
    else of PCI.
    ``entry``: guest-physical start address (the loader's entry point).
    ``dev``/``host``: the device path, or a host object speaking the same
    protocol (see the module docstring); a given host is not closed by us.
    ``mmio_limit``: end of the guest-physical MMIO region, page-rounded (the
    caller knows where its BARs are; default 4 GiB: every page above RAM
    traps, and accesses in no BAR are re-injected).  ``log(line)``:
    diagnostics.
    LHREQ_INITIALIZE is written here, as the reference's ``tell_kernel``.
    """

    def __init__(self, gm, bus, entry: int, dev: str = "/dev/lguest", host=None, *, cpu_id: int = 0,
                 mmio_limit: int | None = None, word_bytes: int = WORD_BYTES, log=None):
        if word_bytes not in (4, 8):
            raise ValueError(f"word_bytes must be 4 or 8, got {word_bytes}")
        if not gm.check(entry, 1):
            raise ValueError(f"entry point {entry:#x} is outside guest RAM ({gm.size:#x} bytes)")
        if getattr(bus, "notify_mode", "single") != "single":
            raise ValueError("lguest has no ioeventfds: build the bus with notify_mode='single'")
        if not 0 <= cpu_id < 1 << 31:
            raise ValueError(f"cpu_id must be a small non-negative number, got {cpu_id}")
        self.gm, self.bus, self.entry, self.cpu_id = gm, bus, entry, cpu_id
        self.word = word_bytes
        self.log = log
        # Per-trap requests carry values already in range (constant offsets,
        # 32-bit register values): prebuilt packers skip encode_request's checks.
        code = "I" if word_bytes == 4 else "Q"
        self._pack2 = struct.Struct(f"<2{code}").pack
        self._pack3 = struct.Struct(f"<3{code}").pack
        if mmio_limit is None:
            mmio_limit = 1 << 32
        mmio_limit = (mmio_limit + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        if not gm.size < mmio_limit <= 1 << 32:
            raise ValueError(f"MMIO limit {mmio_limit:#x} must lie above RAM ({gm.size:#x}) and within 4 GiB")
        self.mmio_limit = mmio_limit
        for line, _ in bus.interrupts():
            if not 0 <= line < LGUEST_IRQS:
                raise ValueError(f"interrupt line {line} is beyond lguest's {LGUEST_IRQS} lines")
        self.stats = ExitStats()
        self._stop = False
        self._relay = None
        self._relay_pipe = None
        self._relay_error = None
        # Decoding is a pure function of the 7 bytes, and a guest traps on the
        # same few accessor instructions over and over: a dict lookup is ~50x
        # cheaper than a decoder call from Python.
        self._pio_decoded: dict = {}
        self._mmio_decoded: dict = {}
        self._own_host = host is None
        self.host = DevLguest(dev) if host is None else host
        self.init_args = (gm.base, gm.size // PAGE_SIZE, entry, mmio_limit // PAGE_SIZE)
        try:
            self._request(self.host.write, "LHREQ_INITIALIZE", LHREQ_INITIALIZE, *self.init_args)
        except BaseException:
            if self._own_host:
                self.host.close()
            raise

    # -- requests ------------------------------------------------------------

    def _request(self, send, name, *words):
        try:
            return send(encode_request(*words, word_bytes=self.word))
        except OSError as e:
            raise LguestError(e.errno, f"{name} {words[1:]} failed: {e.strerror}") from None

    def getreg(self, offset: int) -> int:
        """The 32-bit guest register at ``offset`` in user_regs_struct."""
        try:
            self.host.pwrite(self._pack2(LHREQ_GETREG, offset), self.cpu_id)
            data = self.host.pread(self.word, self.cpu_id)
        except OSError as e:
            raise LguestError(e.errno, f"LHREQ_GETREG of register offset {offset} failed: {e.strerror}") from None
        if len(data) != self.word:
            raise LguestError(errno.EIO, f"reading register at offset {offset}: got {len(data)} bytes")
        return int.from_bytes(data, "little") & _U32

    def setreg(self, offset: int, value: int) -> None:
        try:
            self.host.pwrite(self._pack3(LHREQ_SETREG, offset, value & _U32), self.cpu_id)
        except OSError as e:
            raise LguestError(e.errno, f"LHREQ_SETREG of register offset {offset} failed: {e.strerror}") from None

    def reinject(self, trap: int) -> None:
        """Deliver ``trap`` to the guest: the fault it would have had anyway."""
        self._request(self.host.write, "LHREQ_TRAP", LHREQ_TRAP, trap)
        self.stats.assists[f"reinject{trap}"] = self.stats.assists.get(f"reinject{trap}", 0) + 1

    def send_irq(self, line: int) -> None:
        self._request(self.host.write, "LHREQ_IRQ", LHREQ_IRQ, line)
        self.stats.intr += 1

    def _note(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    # -- running ------------------------------------------------------------

    def run(self, max_traps: int | None = None) -> RunResult:
        """Run the guest until it dies ("died", its reason in ``message``:
        exit status 1), asks to reboot ("reboot": exit status None, the
        CLI re-executes), ``stop()`` is called or ``max_traps`` traps were
        handled ("stopped"), or something we cannot handle happens
        ("internal-error")."""
        self._stop = False
        self._start_relay()
        handled = 0
        try:
            while True:
                if self._stop:
                    return self._stopped()
                r = self.step()
                if r is not None:
                    return r
                handled += 1
                if max_traps is not None and handled >= max_traps:
                    return RunResult("stopped", f"{handled} traps handled (max_traps)")
        finally:
            self._stop_relay()

    def step(self) -> RunResult | None:
        """Run the guest to its next trap and handle it; None to carry on,
        else why the guest cannot go on."""
        try:
            data = self.host.pread(PENDING.size, self.cpu_id)
        except InterruptedError:
            return self._stopped() if self._stop else None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return RunResult("died", self._death_reason())
            if e.errno == errno.ERESTART:
                return RunResult("reboot", "the guest asked to restart")
            return RunResult("internal-error", f"running the guest failed: {e.strerror or e}")
        if len(data) != PENDING.size:
            return RunResult("internal-error", f"read {len(data)} bytes from the lguest device, "
                                               f"expected a {PENDING.size}-byte struct lguest_pending")
        trap, insn, addr = PENDING.unpack(data)
        self.stats.total += 1
        try:
            if trap == TRAP_GPF:
                self.stats.pio += 1
                self.emulate_insn(insn)
            elif trap == TRAP_PAGE_FAULT:
                self.stats.mmio += 1
                self.emulate_mmio(addr, insn)
            else:
                return RunResult("internal-error", f"unknown trap {trap} (address {addr:#x})", insn=insn)
        except LguestError as e:
            # The reference launcher dies with err(1) here; we say why and stop.
            return RunResult("internal-error", f"emulating trap {trap}: {e.strerror}", insn=insn)
        return None

    def _stopped(self) -> RunResult:
        if self._relay_error is not None:
            return RunResult("internal-error", self._relay_error)
        return RunResult("stopped", "stop() was called")

    def _death_reason(self) -> str:
        try:
            raw = self.host.pread(REASON_BYTES, self.cpu_id)
        except OSError as e:
            return f"the guest died (its reason could not be read: {e.strerror or e})"
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or "the guest died (no reason given)"

    def stop(self) -> None:
        """Make ``run`` return "stopped": at once if the host can interrupt
        its ``pread``, else at the next trap."""
        self._stop = True
        kick = getattr(self.host, "interrupt", None)
        if kick is not None:
            kick()

    # -- emulation ----------------------------------------------------------

    @staticmethod
    def _decoded(cache: dict, decode, insn: bytes):
        d = cache.get(insn)
        if d is None:
            d = decode(insn)
            if len(cache) >= DECODE_CACHE_ENTRIES:
                cache.clear()
            cache[insn] = d
        return d

    def _skip(self, length: int) -> None:
        self.setreg(REG["eip"], self.getreg(REG["eip"]) + length)

    def _full_insn(self, insn: bytes) -> bytes | None:
        """Up to 15 instruction bytes from guest memory at EIP when the host
        copied too few, or None (not a linearly mapped kernel address, or
        memory there no longer holds the host's bytes)."""
        eip = self.getreg(REG["eip"])
        phys = eip - GUEST_PAGE_OFFSET
        if phys < 0 or not self.gm.check(phys, len(insn)):
            return None
        n = min(MAX_INSN_LEN, self.gm.size - phys)
        full = self.gm.read(phys, n)
        return full if full.startswith(insn) else None

    def emulate_insn(self, insn: bytes) -> None:
        """Trap 13: port I/O or ``cli`` from the guest kernel, else re-inject."""
        if self.getreg(REG["xcs"]) & 3 != GUEST_KERNEL_RPL:
            self._note(f"trap 13 from guest user mode (insn {insn.hex(' ')}): re-injected")
            return self.reinject(TRAP_GPF)
        d = self._decoded(self._pio_decoded, decode_pio, insn)
        if not d.ok:
            self._note(f"trap 13 on {insn.hex(' ')}: {error_message(d.error)}: re-injected")
            return self.reinject(TRAP_GPF)
        if d.width == 0:   # cli: the guest's own interrupt flag lives in the host
            self.stats.assists["cli"] = self.stats.assists.get("cli", 0) + 1
            return self._skip(d.length)
        port = d.port if d.port >= 0 else self.getreg(REG["edx"]) & 0xFFFF
        eax = self.getreg(REG["eax"])
        if d.is_write:
            self.bus.pio(port, d.width, True, register_operand(eax, d.width))
        else:
            if port == PS2_STATUS_PORT:     # nobody claims it here: lguest's answer ends i8042 probing
                val = unclaimed_port_read(port, d.width)
            else:
                val = self.bus.pio(port, d.width, False, 0)
            self.setreg(REG["eax"], merge_register(eax, val, d.width))
        self._skip(d.length)

    def emulate_mmio(self, addr: int, insn: bytes) -> None:
        """Trap 14: a ``mov`` to or from a device's BAR0, else re-inject."""
        d = self._decoded(self._mmio_decoded, decode_mmio, insn)
        if not d.ok and len(insn) < MAX_INSN_LEN:
            full = self._full_insn(insn)
            if full is not None:
                d = decode_mmio(full)
        if not d.ok:
            self._note(f"MMIO at {addr:#x} by {insn.hex(' ')}: {error_message(d.error)}: re-injected")
            return self.reinject(TRAP_PAGE_FAULT)
        if self.bus.bar_at(addr, d.width) is None:
            self._note(f"MMIO touching {addr:#x} ({d.width} bytes), which is no device's BAR0: re-injected")
            return self.reinject(TRAP_PAGE_FAULT)
        off = REG_BY_NUMBER[d.reg]   # 32-bit guest: reg is 0..7, AH..BH folded by the decoder
        if d.is_write:
            self.bus.mmio(addr, d.width, True, register_operand(self.getreg(off), d.width, d.high))
        else:
            val = self.bus.mmio(addr, d.width, False, 0)
            self.setreg(off, merge_register(self.getreg(off), val, d.width, d.high))
        self._skip(d.length)

    # -- interrupts ---------------------------------------------------------

    def _start_relay(self) -> None:
        pairs = list(self.bus.interrupts())
        if not pairs or self._relay is not None:
            return
        self._relay_error = None
        self._relay_pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._relay = threading.Thread(target=self._relay_irqs, args=(pairs, self._relay_pipe[0]),
                                       name="lguest-irq", daemon=True)
        self._relay.start()

    def _stop_relay(self) -> None:
        if self._relay is None:
            return
        os.write(self._relay_pipe[1], b"x")
        self._relay.join()
        for fd in self._relay_pipe:
            os.close(fd)
        self._relay = self._relay_pipe = None

    def _relay_irqs(self, pairs, stop_fd) -> None:
        """Each device eventfd write becomes one LHREQ_IRQ (writes that pile
        up while we are busy collapse into one, like an edge the guest has
        not taken yet)."""
        lines = {}
        poller = select.poll()
        for line, efd in pairs:
            os.set_blocking(efd, False)
            lines.setdefault(efd, line)
            poller.register(efd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == stop_fd:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                try:
                    self.send_irq(lines[fd])
                except OSError as e:
                    self._relay_error = f"raising interrupt {lines[fd]}: {e.strerror or e}"
                    self.stop()
                    return

    def close(self) -> None:
        self._stop_relay()
        if self._own_host and self.host is not None:
            self.host.close()
        self.host = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = [
    "LguestBackend", "DevLguest", "LguestError", "available", "encode_request", "decode_request",
    "LHREQ_INITIALIZE", "LHREQ_IRQ", "LHREQ_GETREG", "LHREQ_SETREG", "LHREQ_TRAP", "PENDING",
    "TRAP_GPF", "TRAP_PAGE_FAULT", "USER_REGS", "REG", "REG_BY_NUMBER", "WORD_BYTES", "GUEST_PAGE_OFFSET",
]
