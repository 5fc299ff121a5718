"""--profile: RIP sampling of the vCPU, symbolized with the kernel's ELF
symbol table, written as folded stacks, summed up in a top table.

The tiny guest here is an ELF "kernel" with a symbol table, entered by the
loader in long mode at CPL0: it says 'S', spins in a function of known name
until the test sets a flag in its memory (tests/guestflag.py: as long on
hardware KVM as on our emulating hosts), then halts for good, which ends
the run with status 0."""
import collections
import json
import struct
import subprocess
import sys
import time

import pytest

from lguest_jit.hw.kvm import kvm_available
from lguest_jit.hw.profile import (KERNEL_FRAME, USER_FRAME, ProfileError, Symbols, fold, folded_text,
                                   leaf_totals, parse_folded, top_table)
from guestflag import read_within, release, spin_until_released, with_flag
from lguest_jit.hw.tinyguest import RAX, RDX, Asm

needs_kvm = pytest.mark.skipif(kvm_available() is not None, reason=f"KVM unusable: {kvm_available()}")

LOAD = 0x100000
FLAG = LOAD + 0x400
HOT = "spin_in_known_function"
# Turns of the two-instruction spin between looks at the flag (the guest
# spins until released, not for a number of turns).
SPIN_TURNS = 4000
# How long the test lets it spin: several times the ~1 s the launcher's halt
# poll takes to see the final `cli; hlt` (samples there go to the_end).
SPIN_SECONDS = 3.0


def elf_with_symbols(code: bytes, addr: int, symbols) -> bytes:
    """An ELF64 executable: one PT_LOAD of ``code`` at ``addr`` (virtual =
    physical), a .text section over it, and a .symtab of FUNC symbols
    ``[(name, offset, size)]``; ``symbols=None``: stripped, no sections."""
    if symbols is None:
        ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                           2, 62, 1, addr, 64, 0, 0, 64, 56, 1, 64, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, addr, addr, len(code), len(code), 0x1000)
        return ehdr + phdr + bytes(0x1000 - 120) + code
    text_off = 0x1000
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in symbols)
    syms = [bytes(24)]
    pos = 1
    for name, off, size in symbols:
        syms.append(struct.pack("<IBBHQQ", pos, (1 << 4) | 2, 0, 1, addr + off, size))   # GLOBAL FUNC in .text
        pos += len(name) + 1
    symtab = b"".join(syms)
    shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
    body = bytearray(code)
    sym_off = text_off + len(body)
    body += symtab
    str_off = text_off + len(body)
    body += strtab
    shs_off = text_off + len(body)
    body += shstrtab
    body += bytes(-len(body) % 8)
    sh_off = text_off + len(body)
    shdrs = [bytes(64),
             struct.pack("<IIQQQQIIQQ", 1, 1, 0x6, addr, text_off, len(code), 0, 0, 16, 0),        # .text AX
             struct.pack("<IIQQQQIIQQ", 7, 2, 0, 0, sym_off, len(symtab), 3, 1, 8, 24),             # .symtab
             struct.pack("<IIQQQQIIQQ", 15, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0),             # .strtab
             struct.pack("<IIQQQQIIQQ", 23, 3, 0, 0, shs_off, len(shstrtab), 0, 0, 1, 0)]           # .shstrtab
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 62, 1, addr, 64, sh_off, 0, 64, 56, 1, 64, len(shdrs), 4)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, text_off, addr, addr, len(code), len(code), 0x1000)
    head = ehdr + phdr
    return head + bytes(text_off - len(head)) + bytes(body) + b"".join(shdrs)


def spinning_guest(turns: int = SPIN_TURNS):
    """(code, symbols): _start says 'S', HOT spins until FLAG is set, the_end
    halts; the flag (and its marker) follow the_end, outside every symbol."""
    a = Asm(LOAD)
    a.label("_start").mov_imm32(RDX, 0x3F8).mov_imm32(RAX, ord("S")).out(1)
    spin_until_released(a, FLAG, turns, label=HOT)
    a.label("the_end").cli().hlt().jmp("the_end")
    end = len(bytes(a))
    ends = {"_start": a.labels[HOT], HOT: a.labels["the_end"], "the_end": end}
    starts = {"_start": 0, HOT: a.labels[HOT], "the_end": a.labels["the_end"]}
    return with_flag(bytes(a)), [(n, starts[n], ends[n] - starts[n]) for n in starts]


# ---------------------------------------------------------------- symbols and the folded format

def test_symbols_bisect_to_the_containing_function(tmp_path):
    code, syms = spinning_guest()
    path = tmp_path / "k.elf"
    path.write_bytes(elf_with_symbols(code, LOAD, syms))
    table = Symbols.from_elf(str(path))
    assert len(table) == 3
    for name, off, size in syms:
        assert table.lookup(LOAD + off) == name
        assert table.lookup(LOAD + off + size - 1) == name
    assert table.lookup(LOAD - 1) is None                 # before the first symbol
    assert table.lookup(LOAD + syms[-1][1] + syms[-1][2]) is None         # past the last one's size


def test_images_without_symbols_say_why(tmp_path):
    raw = tmp_path / "bzImage"
    raw.write_bytes(b"MZ" + bytes(1000))
    with pytest.raises(ProfileError, match="not an ELF vmlinux"):
        Symbols.from_elf(str(raw))
    code, _ = spinning_guest()
    stripped = tmp_path / "stripped.elf"
    stripped.write_bytes(elf_with_symbols(code, LOAD, None))
    with pytest.raises(ProfileError, match="no symbol table"):
        Symbols.from_elf(str(stripped))


def flamegraph_pl_read(text: str) -> collections.Counter:
    """What flamegraph.pl takes from each line (its regex
    ``^(.*)\\s+?(\\d+(?:\\.\\d*)?)$``, frames split on ';'): an independent
    reading to check ours against."""
    import re
    out = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"^(.*)\s+?(\d+(?:\.\d*)?)$", line)
        assert m, f"flamegraph.pl would skip this line: {line!r}"
        out[tuple(m.group(1).split(";"))] += int(m.group(2))
    return out


def test_folded_output_reads_as_a_flame_graph_tool_reads_it(tmp_path):
    code, syms = spinning_guest()
    path = tmp_path / "k.elf"
    path.write_bytes(elf_with_symbols(code, LOAD, syms))
    table = Symbols.from_elf(str(path))
    hot = LOAD + syms[1][1]
    counts = collections.Counter({(0, hot): 70, (0, hot + 2): 5, (0, LOAD): 3, (3, 0x401000): 20,
                                  (3, 0x402000): 1, (0, 0xdead0000): 2})
    stacks = fold(counts, table)
    text = folded_text(stacks)
    assert text.endswith("\n") and all(line.count(" ") == 1 for line in text.splitlines())
    read = flamegraph_pl_read(text)
    assert read == parse_folded(text)
    assert read == {(KERNEL_FRAME, HOT): 75, (USER_FRAME,): 21, (KERNEL_FRAME, "_start"): 3,
                    (KERNEL_FRAME, "0xdead0000"): 2}
    assert sum(read.values()) == sum(counts.values())
    # Hottest first, and the table ranks leaves.
    assert text.splitlines()[0] == f"{KERNEL_FRAME};{HOT} 75"
    assert leaf_totals(stacks).most_common(1) == [(HOT, 75)]
    assert top_table(stacks)[1].split()[-1] == HOT
    with pytest.raises(ValueError, match="line 2"):
        parse_folded("a;b 1\na;b\n")


def test_report_survives_an_output_it_cannot_write(tmp_path):
    """The run's result is never lost to the file: the table still prints,
    with one line saying why the file is missing."""
    from lguest_jit.hw.profile import Profiler, report
    code, syms = spinning_guest()
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_with_symbols(code, LOAD, syms))
    prof = Profiler(100)
    hot = LOAD + syms[1][1]
    prof.rips, prof.cpls, prof.weights = [hot, hot, LOAD], [0, 0, 0], [1, 2, 1]
    lines = report(prof, str(kernel), str(tmp_path / "gone" / "p.folded"))
    assert lines[0].startswith("lguest-jit profile: 4 samples at 100 Hz") and "folded stacks in" not in lines[0]
    assert lines[1].startswith("  could not write ") and lines[1].count("\n") == 0
    assert lines[3].split()[-1] == HOT and lines[3].split()[1] == "3"


def test_mid_run_stacks_name_the_cpu_as_the_exit_file_does(tmp_path):
    """SIGUSR1's folded stacks of a 2-vCPU run (folded_now) lead with the
    CPU frame exactly as the file written at exit does, so the two can be
    subtracted; a 1-vCPU profile has no CPU frame in either."""
    from lguest_jit.hw.profile import Profiler, folded_now, report
    code, syms = spinning_guest()
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_with_symbols(code, LOAD, syms))
    hot = LOAD + syms[1][1]
    prof = Profiler(100)
    prof.rips, prof.cpls, prof.weights, prof.cpus = [hot, hot, 0x401000], [0, 0, 3], [1, 2, 4], [0, 1, 1]
    mid = parse_folded(folded_now(prof, str(kernel)))
    assert mid == {("cpu0", KERNEL_FRAME, HOT): 1, ("cpu1", KERNEL_FRAME, HOT): 2, ("cpu1", USER_FRAME): 4}
    report(prof, str(kernel), str(tmp_path / "p.folded"))
    assert parse_folded((tmp_path / "p.folded").read_text()) == mid
    one = Profiler(100)
    one.rips, one.cpls, one.weights, one.cpus = [hot], [0], [3], [0]
    assert parse_folded(folded_now(one, str(kernel))) == {(KERNEL_FRAME, HOT): 3}


def test_launcher_side_lines():
    """Threads busiest first with their share of the wall time, exits by
    kind and each breakdown busiest first, interrupts per queue."""
    from lguest_jit.hw.profile import launcher_lines
    stats = {"elapsed_s": 10.0,
             "threads": {"rng:requests": {"user_s": 0.5, "system_s": 0.5},
                         "vcpu0": {"user_s": 1.0, "system_s": 4.0}},
             "queues": {"rng": {"requests": {"requests": 3, "interrupts": 2}}},
             "exits": {"pio": 7, "mmio": 5, "total": 12, "assists": {"int3": 1, "fwait": 4}}}
    lines = launcher_lines(stats)
    assert lines[1].split()[:3] == ["vcpu0", "5.000", "s"] and "50.0%" in lines[1]
    assert lines[2].split()[0] == "rng:requests" and "10.0%" in lines[2]
    assert lines[3] == "  exits: pio 7 mmio 5 total 12"
    assert lines[4] == "  exits, assists: fwait 4, int3 1"
    assert lines[5] == "  interrupts per queue: rng/requests 2"


# ---------------------------------------------------------------- sampling a vCPU in-process

def _no_devices(gm):
    """A bus with nothing on it that answers every access with 0."""
    from lguest_jit import pci
    bus = pci.Bus(gm)
    bus.set_fallback(pio=lambda *access: 0, mmio=lambda *access: 0)
    return bus


@needs_kvm
@pytest.mark.parametrize("cpl", [3, 0])
@pytest.mark.parametrize("sync_regs", [True, False], ids=["kvm_run-synced", "ioctls"])
def test_every_sample_is_where_the_guest_spins(cpl, sync_regs):
    """A guest in `jmp $` at CPL3 (native) or CPL0 (emulated): every sample
    has its RIP and privilege level, read from kvm_run's synced registers
    or through KVM_GET_REGS/SREGS; afterwards the VM closes cleanly (no
    view of kvm_run left behind)."""
    from lguest_jit.vcpu import KvmVm
    from lguest_jit.hw.memory import GuestMemory
    from lguest_jit.hw.profile import Profiler
    from lguest_jit.hw.tinyguest import CODE, setup_long_mode
    gm = GuestMemory(2 << 20)
    vm = KvmVm(gm, _no_devices(gm))
    try:
        setup_long_mode(vm, bytes(Asm(CODE).label("spin").jmp("spin")), cpl=cpl)
        prof = Profiler(500, sync_regs=sync_regs).attach(vm)
        prof.start()
        synced = prof.synced
        try:
            res = vm.run(timeout=1.0, halt_poll=None)
        finally:
            prof.stop()
        if sync_regs and not synced:
            pytest.skip("this KVM lacks KVM_CAP_SYNC_REGS")
        assert synced == sync_regs and not prof.synced
        assert res.reason == "timeout", res.report()
        counts = prof.counts()
        assert set(counts) == {(cpl, CODE)}, counts
        assert prof.failed == 0
    finally:
        vm.close()
        gm.close()


# ---------------------------------------------------------------- the command line

def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lguest_jit.main", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _run_spinning(*args, seconds=SPIN_SECONDS, timeout=300):
    """Run the launcher on the spinning guest: once it said 'S' (it spins),
    let it spin ``seconds`` s, then release it to halt."""
    proc = subprocess.Popen([sys.executable, "-m", "lguest_jit.main", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = read_within(proc.stdout, 1, timeout)
        if said != b"S":
            proc.kill()
            pytest.fail(f"the guest said {said!r}, not 'S': {proc.stderr.read().decode()[-2000:]}")
        time.sleep(seconds)
        assert release(proc, FLAG, 64 << 20, timeout)
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (said + out).decode(), err.decode())


@pytest.mark.parametrize("args,message", [
    (["--profile-hz=100"], "--profile-hz needs --profile"),
    (["--profile={out}", "--profile-hz=0"], "must be between 1 and"),
    (["--profile={out}", "--profile-hz=fast"], "not a whole number"),
    (["--profile={out}", "--profile-hz=1000000"], "must be between 1 and"),
    (["--profile={tmp}"], "is a directory"),
    (["--profile=/nonexistent/dir/p.folded"], "cannot write into"),
])
def test_bad_profile_arguments_are_one_line(tmp_path, args, message):
    """Refused before anything is made, and before Numba or numpy load
    (test_cli's probe of what the command imported)."""
    from test_cli import _WHAT_WAS_IMPORTED
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF" + bytes(100))
    out = tmp_path / "p.folded"
    args = [a.format(out=out, tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-c", _WHAT_WAS_IMPORTED, *args, "64", str(kernel)], capture_output=True,
                       text=True, timeout=60)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"status": 2, "loaded": []}, r.stderr
    assert r.stderr.startswith("lguest-jit: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()


@needs_kvm
def test_profile_finds_the_spinning_function_at_the_top(tmp_path):
    code, syms = spinning_guest()
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(elf_with_symbols(code, LOAD, syms))
    out = tmp_path / "spin.folded"
    r = _run_spinning(f"--profile={out}", "64", str(kernel))
    assert r.returncode == 0, r.stderr
    stacks = parse_folded(out.read_text())
    leaves = collections.Counter()
    for frames, n in stacks.items():
        leaves[frames[-1]] += n
    assert leaves.most_common(1)[0][0] == HOT, leaves
    # Every sample was at CPL0 in the guest's own code, each symbolized.
    assert set(leaves) <= {"_start", HOT, "the_end"}, leaves
    assert all(frames[0] == KERNEL_FRAME for frames in stacks)
    # The report on stderr: the header, then HOT ranked first, then the launcher's side.
    err = r.stderr.splitlines()
    head = next(i for i, line in enumerate(err) if line.startswith("lguest-jit profile: "))
    assert f"{sum(stacks.values())} samples at 1000 Hz" in err[head]
    assert err[head + 2].split()[0] == "1" and err[head + 2].split()[-1] == HOT
    assert any("vcpu0" in line for line in err[head:])
    assert any(line.startswith("  exits: ") for line in err[head:])


@needs_kvm
def test_profile_without_symbols_prints_raw_addresses(tmp_path):
    code, syms = spinning_guest()
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(elf_with_symbols(code, LOAD, None))
    out = tmp_path / "spin.folded"
    r = _run_spinning(f"--profile={out}", "--profile-hz=200", "64", str(kernel), seconds=SPIN_SECONDS / 4)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no kernel symbols:") == 1
    stacks = parse_folded(out.read_text())
    leaves = {frames[-1] for frames in stacks}
    assert leaves and all(int(leaf, 16) in range(LOAD, LOAD + len(code)) for leaf in leaves), leaves


# ---------------------------------------------------------------- the default guest's boot

@pytest.mark.slow
@needs_kvm
def test_profile_of_the_default_guest_boot_names_kernel_functions(tmp_path):
    """The default guest boots (its `boot` workload: /init says LGJ-INIT
    and powers off) under --profile; its top 20 holds kernel functions
    whose names are in vmlinux's symbol table, read here with pyelftools'
    own symbol iterator, independently of the profiler's reader."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from elftools.elf.elffile import ELFFile

    from guest import build
    vmlinux, initrd = build.ensure_guest(log=lambda m: print(m, flush=True))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    out = tmp_path / "boot.folded"
    r = _run(f"--profile={out}", "--rng", f"--block={disk}", f"--initrd={initrd}", "256", str(vmlinux),
             *build.default_cmdline("boot", "hvc0").split(), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LGJ-INIT" in r.stdout
    stacks = parse_folded(out.read_text())
    total = sum(stacks.values())
    assert total > 1000, total                     # tens of seconds at 1000 Hz
    leaves = collections.Counter()
    for frames, n in stacks.items():
        leaves[frames[-1]] += n
    top20 = [name for name, _ in leaves.most_common(20)]
    with open(vmlinux, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        names = {s.name for s in symtab.iter_symbols() if s["st_info"]["type"] == "STT_FUNC"}
    kernel_hits = [name for name in top20 if name in names]
    assert kernel_hits, top20
    # The same ranking on stderr.
    err = r.stderr.splitlines()
    head = next(i for i, line in enumerate(err) if line.startswith("lguest-jit profile: "))
    assert err[head + 2].split()[-1] == top20[0]
    print(f"\nboot profile: {total} samples; top 20: {leaves.most_common(20)}")
