"""The cross-device collectives of a compiled program, read from its HLO text (`compiled.as_text()`): what moves
between chips, how much, among how many and for which op. The tests and the benchmarks hold the step's
communication to this (FSDP gathers weights, never activations; grad_accum reduces its gradient once)."""

from __future__ import annotations

import dataclasses
import math
import re

# `%name = SHAPE(S) all-gather(...)` (one result or a tuple of them, whose TPU layouts hold parentheses:
# {1,0:T(8,128)}); `-start` is the asynchronous form
_OP = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+)(\d*)\[([\d,]*)\]")
_NAME = re.compile(r'op_name="([^"]*)"')
# replica groups, in each form XLA prints them: named mesh axes, an iota [groups,size]<=[devices], or listed
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\],?(?: device_ids=\S+)? \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_BITS = {"pred": 8}
# a computation's first line: `%name (params) -> result {` or `ENTRY %name ...`; a loop: `while(...),
# condition=%name, body=%name, ... "known_trip_count":{"n":"12"}` (XLA:CPU says it; libtpu does not, and its
# condition then compares the counter with the count: `constant(12)` ... `compare(...), direction=LT`)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_WHILE = re.compile(r" while\(.*?condition=%([\w.\-]+), body=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_COUNT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")
_REFERENCE = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-gather, all-reduce, reduce-scatter, all-to-all
    shapes: list[tuple[int, ...]]  # its results'
    bytes: int  # its results' together
    group: int | None  # devices in one of its groups (None: the groups were not printed)
    name: str  # the jax op it comes from ("" without metadata), with its scopes ("/while/body/", named scopes)
    runs: int = 1  # times a run of the program runs it: the known trip counts of the loops around it multiplied

    @property
    def largest(self) -> int:
        """Elements of its largest result."""
        return max((math.prod(s) for s in self.shapes), default=0)


def group_size(line: str) -> int | None:
    named = _MESH_GROUPS.search(line)
    if named:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", named.group(1))}
        return math.prod(sizes[axis] for axis in re.findall(r"'(\w+)'", named.group(2)))
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota.group(1).split(",")[-1])
    listed = _LISTED_GROUPS.search(line)
    return len(listed.group(1).split(",")) if listed else None


def computation_runs(hlo: str) -> dict[str, int]:
    """Each computation's runs per run of the program: the sum over the places that call it (a loop's body, an
    asynchronous collective's wrapper, a call) of the caller's runs, times the loop's trip count for a body (where
    the compiler states it, or the condition compares the counter with one constant)."""
    lines: dict[str, list[str]] = {}
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        lines.setdefault(computation, []).append(line)
    callers: dict[str, list[tuple[str, str]]] = {}  # computation -> (caller, the calling line)
    for caller, body in lines.items():
        for line in body[1:]:
            for called in set(_REFERENCE.findall(line)) & lines.keys():
                callers.setdefault(called, []).append((caller, line))

    def trips(line: str, called: str) -> int:
        loop = _WHILE.search(line)
        if not loop or loop.group(2) != called:
            return 1
        stated = _TRIPS.search(line)
        if stated:
            return int(stated.group(1))
        counts = [int(c) for text in lines.get(loop.group(1), []) for c in _COUNT.findall(text)]
        return counts[0] if len(counts) == 1 else 1

    memo: dict[str, int] = {}

    def runs(name: str) -> int:
        if name not in memo:
            memo[name] = 1  # (HLO has no recursion; this only guards the walk)
            sites = callers.get(name, [])
            memo[name] = sum(runs(caller) * trips(line, name) for caller, line in sites) if sites else 1
        return memo[name]

    return {name: runs(name) for name in lines}


def of(hlo: str) -> list[Collective]:
    """Each cross-device collective in the compiled program's text."""
    found = []
    computation, runs = "", computation_runs(hlo)
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        op = _OP.search(line)
        if not op:
            continue
        shapes, total = [], 0
        for dtype, bits, dims in _ARRAY.findall(op.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            shapes.append(shape)
            total += math.prod(shape) * int(bits or _BITS.get(dtype, 8)) // 8
        name = _NAME.search(line)
        name_text = name.group(1) if name else ""
        found.append(Collective(op.group(2), shapes, total, group_size(line), name_text, runs.get(computation, 1)))
    return found
