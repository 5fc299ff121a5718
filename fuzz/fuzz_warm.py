"""Target: the warm launcher's request parser (warm.parse_request, the
server's only reading of a client's bytes, and warm.refusal).  Any input
is parsed or refused with ValueError, never anything else (no
RecursionError, no OverflowError); what is accepted is exactly what the
forked child relies on (strings the OS can take, a umask, a finite start
time); the nesting pre-check agrees with the depth of what json built; and
a request is served only when its identity is the server's."""
from __future__ import annotations

import copy
import json
import math
import os

from .common import Reader, digest, main

from lguest_jit import warm

# A server's identity (fixed: the digest must not depend on the machine).
IDENTITY = {"source": "f" * 64, "python": ["/usr/bin/python3", "3.11"], "numba_env": {"NUMBA_CACHE_DIR": "/c"},
            "search_path": {"sys.path": ["/w", "/lib"], "flags": [0, 1], "xoptions": {}, "warnoptions": [],
                            "env": {"PYTHONUNBUFFERED": "1"}},
            "context": {"namespaces": {"mnt": "mnt:[4026531832]"}, "root": [1, 2], "credentials": [0, 0, 0, 0, []],
                        "limits": {"RLIMIT_AS": [-1, -1]}, "cpus": [0, 1]}}
BASE = {"protocol": warm.PROTOCOL, "argv": ["64", "vmlinux", "console=hvc0"], "env": {"HOME": "/root", "TERM": "xterm"},
        "umask": 0o22, "started": 1.7e9, **IDENTITY}
KEYS = sorted(BASE) + ["extra"]
VALUES = ["", "x\0y", "a=b", "\ud800", "\udcff", 0, -1, 1 << 40, 10 ** 30, 2.5, float("nan"), float("inf"), True, None,
          [], ["a"], ["a", 1], {}, {"a": "b"}, {"": "v"}, {"a=b": "c"}, {"a": 1}, [[[[[["deep"]]]]]], "64", 0o777,
          0o1000, -0.0]


def _depth(v) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def _structured(r: Reader) -> bytes:
    req = json.loads(json.dumps(BASE))
    for _ in range(r.u8() % 4):
        key = r.pick(KEYS)
        op = r.u8() % 4
        if op == 0:
            req.pop(key, None)
        elif op == 1:
            req[key] = copy.deepcopy(r.pick(VALUES))
        elif op == 2 and isinstance(req.get(key), dict):
            req[key][r.pick(["HOME", "", "A=B", "mnt", "x\0"])] = copy.deepcopy(r.pick(VALUES))
        elif op == 3 and isinstance(req.get(key), list):
            req[key].append(copy.deepcopy(r.pick(VALUES)))
    line = json.dumps(req).encode()
    if r.u8() & 1:                                   # splice raw bytes in
        at = r.u16() % (len(line) + 1)
        line = line[:at] + r.data[r.pos:r.pos + 64] + line[at:]
    return line + b"\n"


def one_input(data: bytes) -> str:
    r = Reader(data)
    line = _structured(r) if r.u8() & 1 else data[1:]
    try:
        request = warm.parse_request(line)
    except ValueError as exc:
        return digest("refused", str(exc))
    text = line.split(b"\n", 1)[0].decode()
    # The bound holds for the text json.loads recursed through; the value
    # can be shallower (a repeated key keeps only its last value).
    assert _depth(request) <= warm.nesting(text) <= warm.MAX_DEPTH, text[:200]
    # What the child does with an accepted request cannot fail.
    assert request["protocol"] == warm.PROTOCOL
    for a in request["argv"]:
        assert isinstance(a, str) and "\0" not in a
        os.fsencode(a)
    for k, v in request["env"].items():
        assert isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        os.fsencode(k), os.fsencode(v)
    assert type(request["umask"]) is int and 0 <= request["umask"] <= 0o777
    assert type(request["started"]) in (int, float) and math.isfinite(request["started"]) and request["started"] >= 0
    why = warm.refusal(request, IDENTITY)
    same = all(request.get(k) == IDENTITY[k] for k in IDENTITY)
    assert (why is None) == same, (why, same)
    return digest("accepted" if why is None else "declined", why)


if __name__ == "__main__":
    main("fuzz.fuzz_warm")
