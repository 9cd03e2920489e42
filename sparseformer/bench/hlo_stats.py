"""What a compiled program launches: kernels counted from XLA's optimized HLO text.

On a GPU every fusion, custom call (cuBLAS, cuDNN, a Pallas/Triton kernel) and copy left in the
optimized program is one kernel launch, and a `while` loop launches its body once per trip. A
program of many small kernels is bound by their launch and ramp-up (a few microseconds each),
not by its FLOPs, so the count tells whether a short sequence can be fast at all; it is read at
compile time, with no device. `launches(compiled.as_text())` counts them, loops multiplied out
by XLA's own `known_trip_count`; `launches_by_source` says which function of the code each came
from (the innermost frame of XLA's stack-frame metadata).
"""

from __future__ import annotations

import collections
import dataclasses
import re

FREE_OPS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
})
"""Opcodes that launch nothing themselves (control flow is counted through its computations)."""

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9\-]*)\(")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    line: str


@dataclasses.dataclass(frozen=True)
class Module:
    computations: dict[str, list[Instruction]]
    entry: str
    text: str


def parse(text: str) -> Module:
    """The computations of an HLO module's text, each a list of its instructions."""
    computations: dict[str, list[Instruction]] = {}
    current, entry = None, None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
            elif line.startswith("}"):
                current = None
            continue
        m = _INSTRUCTION.match(line) if current is not None else None
        if m:
            computations[current].append(Instruction(m.group(1), m.group(2), line))
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return Module(computations, entry, text)


def _trip_count(line: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    return int(m.group(1)) if m else None


def _called(line: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", line) or re.search(key + r"=(%[^\s,]+)", line)
    return re.findall(r"%([^\s,}]+)", m.group(1)) if m else []


def _kind(ins: Instruction) -> str:
    if ins.opcode == "custom-call":
        m = re.search(r'custom_call_target="([^"]*)"', ins.line)
        return "custom-call:" + (m.group(1) if m else "?")
    if ins.opcode == "fusion":
        m = re.search(r"kind=(k\w+)", ins.line)
        return "fusion:" + (m.group(1) if m else "?")
    return ins.opcode


def _walk(module: Module, computation: str, times: int, visit, loops: list) -> None:
    """Calls `visit(instruction, times)` for every launching instruction reached from `computation`,
    `times` the number of runs (loops multiplied out; an unknown trip count counts once, and its
    condition once more)."""
    for ins in module.computations[computation]:
        if ins.opcode == "while":
            n = _trip_count(ins.line)
            op_name = re.search(r'op_name="([^"]*)"', ins.line)
            loops.append({"name": ins.name, "trip_count": n, "runs": times,
                          "op_name": op_name.group(1) if op_name else ""})
            _walk(module, _called(ins.line, "body")[0], times * (n or 1), visit, loops)
            if n is None:
                _walk(module, _called(ins.line, "condition")[0], times * 2, visit, loops)
        elif ins.opcode == "conditional":  # every branch counted: an upper bound
            for branch in _called(ins.line, "branch_computations") or (
                    _called(ins.line, "true_computation") + _called(ins.line, "false_computation")):
                _walk(module, branch, times, visit, loops)
        elif ins.opcode == "call":
            for callee in _called(ins.line, "to_apply"):
                _walk(module, callee, times, visit, loops)
        elif ins.opcode not in FREE_OPS:
            visit(ins, times)


def launches(text: str) -> dict:
    """Kernel launches of one run of the program: `{"launches": total, "by_kind": {kind: count},
    "loops": [{"name", "trip_count", "runs", "op_name"}]}` (`by_kind` keys: `fusion:kLoop`,
    `custom-call:TARGET`, `copy`, ...)."""
    module = parse(text)
    kinds: collections.Counter = collections.Counter()
    loops: list = []
    _walk(module, module.entry, 1, lambda ins, times: kinds.update({_kind(ins): times}), loops)
    return {"launches": sum(kinds.values()), "by_kind": dict(kinds.most_common()), "loops": loops}


def _frames(text: str):
    """Stack-frame id -> the list of (file, function) from the innermost frame out."""
    head, _, rest = text.partition("FunctionNames")
    files = dict(re.findall(r'^(\d+) "([^"]*)"', head.rpartition("FileNames")[2], re.M))
    functions_part, _, rest = rest.partition("FileLocations")
    functions = dict(re.findall(r'^(\d+) "([^"]*)"', functions_part, re.M))
    locations = {m[0]: (m[1], m[2]) for m in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", rest, re.M)}
    parents = {m[0]: (m[1], m[2]) for m in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", rest, re.M)}

    def stack(frame: str) -> list[tuple[str, str]]:
        out, seen = [], set()
        while frame in parents and frame not in seen:
            seen.add(frame)
            location, frame = parents[frame]
            file_id, function_id = locations.get(location, ("", ""))
            out.append((files.get(file_id, "?"), functions.get(function_id, "?")))
        return out

    return stack


def launches_by_source(text: str, package: str = "sparseformer") -> dict[str, int]:
    """Launches per source function: the innermost frame inside `package` (`module.function`;
    `?` where XLA kept no stack frame, as for most layout copies), most first."""
    module = parse(text)
    stack = _frames(text)
    counts: collections.Counter = collections.Counter()

    def visit(ins: Instruction, times: int) -> None:
        m = re.search(r"stack_frame_id=(\d+)", ins.line)
        where = "?"
        for file, function in stack(m.group(1)) if m else []:
            parts = re.split(r"[\\/]", file)
            if package in parts:
                where = ".".join(parts[parts.index(package):])[: -len(".py")] + "." + function
                break
        counts[where] += times

    _walk(module, module.entry, 1, visit, [])
    return dict(counts.most_common())
