"""Host side of the default guest's console protocol (guest/init).

Lines the guest prints (format in guest/README.md):

    LGJ-INIT <uptime> <kernel release>
    LGJ-STEP <name> <OK|FAIL|SKIP> <uptime> <detail...>
    LGJ-DONE <workload> <uptime> ok=<n> fail=<n> skip=<n>
    LGJ-REBOOT <workload> <uptime>          (the persist workload's first boot)

Kernel messages can land in the middle of a console line, so markers are
found anywhere in a line, not only at its start.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_INIT_RE = re.compile(r"LGJ-INIT (\S+) (\S+)")
_STEP_RE = re.compile(r"LGJ-STEP (\S+) (OK|FAIL|SKIP) (\S+) ?([^\r\n]*)")
_DONE_RE = re.compile(r"LGJ-DONE (\S+) (\S+) ok=(\d+) fail=(\d+) skip=(\d+)")
_REBOOT_RE = re.compile(r"LGJ-REBOOT (\S+) (\S+)")

BLOCK_RECORD = 16  # bytes per "lgj-blk %07x\n" record


@dataclass(frozen=True)
class Step:
    name: str
    status: str        # "OK", "FAIL" or "SKIP"
    uptime: float      # guest /proc/uptime seconds when the step ended
    detail: str

    def fields(self) -> dict[str, str]:
        """The key=value words of detail (e.g. {'bytes': '4096', ...})."""
        return dict(w.split("=", 1) for w in self.detail.split() if "=" in w)


@dataclass
class Report:
    kernel: str | None = None
    init_uptime: float | None = None
    steps: list[Step] = field(default_factory=list)
    workload: str | None = None
    done_uptime: float | None = None
    counts: dict[str, int] | None = None   # ok/fail/skip from LGJ-DONE
    rebooted: bool = False                   # LGJ-REBOOT seen

    @property
    def done(self) -> bool:
        return self.counts is not None

    def step(self, name: str) -> Step | None:
        """The last step called name (steps may repeat, e.g. 'shell')."""
        for s in reversed(self.steps):
            if s.name == name:
                return s
        return None

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "FAIL"]


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_console(text: str | bytes) -> Report:
    """Collect every LGJ- marker from a guest's console output."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    rep = Report()
    for line in text.splitlines():
        m = _INIT_RE.search(line)
        if m:
            rep.init_uptime, rep.kernel = _float(m.group(1)), m.group(2)
        m = _STEP_RE.search(line)
        if m:
            rep.steps.append(Step(m.group(1), m.group(2), _float(m.group(3)),
                                  m.group(4).strip()))
        m = _DONE_RE.search(line)
        if m:
            rep.workload, rep.done_uptime = m.group(1), _float(m.group(2))
            rep.counts = {"ok": int(m.group(3)), "fail": int(m.group(4)),
                          "skip": int(m.group(5))}
        if _REBOOT_RE.search(line):
            rep.rebooted = True
    return rep


def parse_boots(text: str | bytes) -> list[Report]:
    """One Report per boot, for a console that saw the guest reboot (the
    launcher re-executes itself): a new boot starts at each LGJ-INIT."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    chunks, cur = [], []
    for line in text.splitlines(keepends=True):
        if _INIT_RE.search(line) and any(_INIT_RE.search(c) for c in cur):
            chunks.append("".join(cur))
            cur = []
        cur.append(line)
    chunks.append("".join(cur))
    return [parse_console(c) for c in chunks if _INIT_RE.search(c)]


def block_pattern(nbytes: int) -> bytes:
    """What the selftest writes at offset 0 of /dev/vda: 16-byte records
    b"lgj-blk %07x\\n" numbered from 0 (nbytes is a multiple of 16)."""
    if nbytes < 0 or nbytes % BLOCK_RECORD:
        raise ValueError(f"nbytes must be a non-negative multiple of {BLOCK_RECORD}")
    return b"".join(b"lgj-blk %07x\n" % i for i in range(nbytes // BLOCK_RECORD))
