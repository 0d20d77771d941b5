"""What a compiled step costs each device, read from XLA: FLOPs and the bytes its collectives move.

`flops_per_device(compiled)` is XLA's cost analysis of the partitioned (per-device) program. XLA counts the
body of a while loop once, whatever its trip count: the micro-batch loop (`train.grad_accum > 1`) and the
chunked LM head's loop over token chunks each count as one iteration, so compare it at grad_accum 1 and
read it as a lower bound. `matmul_flops(hlo_text)` accounts for the trip counts: the FLOPs of every dot
(and ragged dot) times the number of times its loop runs, i.e. the matmul work one device does per step.
It reads `dot` and `ragged-dot` instructions as XLA:CPU leaves them; XLA:GPU rewrites dots into cuBLAS/
Triton custom calls, which it does not count (it would report ~0 there).

`collective_bytes(hlo_text)` parses `compiled.as_text()` and sums, per collective kind, the bytes every
execution of the step moves through that kind of collective: an instruction inside a while loop counts
once per iteration (trip count from the loop's `known_trip_count` backend config, else from the constant
its condition compares the counter with; nested loops multiply). Bytes of one collective are the size of
the whole buffer it works on: max(operand bytes, result bytes), i.e. the reduced buffer of an all-reduce,
the gathered result of an all-gather, the full input of a reduce-scatter. Computations reached through
`call`, fusions or conditional branches count with their caller's multiplicity (both branches of a
conditional count: an upper bound). A loop whose trip count cannot be found counts once.
`collective_counts(hlo_text)` counts the collectives the same way.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES_PER_ELEMENT = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                      "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                      "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed: "(f32[2,3]{1,0}, s32[])" -> 28."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _BYTES_PER_ELEMENT:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _BYTES_PER_ELEMENT[dtype]
    return total


def _split_instruction(rhs: str) -> tuple[str, str, str, str]:
    """"SHAPE opcode(OPERANDS), attributes" -> (shape, opcode, operands, attributes)."""
    if rhs.startswith("("):  # a tuple shape: up to its matching parenthesis
        depth = 0
        for end, char in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        shape, rest = rhs[:end + 1], rhs[end + 1:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, end = 1, 0
    for end, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            break
    return shape, opcode.strip(), rest[:end], rest[end + 1:]


def _parse(hlo_text: str):
    """Computations of the module: ({name: [(instr name, shape, opcode, operands, attributes)]}, entry name)."""
    computations: dict[str, list] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        header = _COMPUTATION.match(stripped)
        if header and "=" not in stripped.split("(")[0]:
            current = header.group(1)
            computations[current] = []
            if stripped.startswith("ENTRY"):
                entry = current
            continue
        if stripped == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if current is not None and match:
            computations[current].append((match.group(1), *_split_instruction(match.group(2))))
    return computations, entry


def _trip_count(attributes: str, condition: list) -> int:
    """A while loop's iterations: its known_trip_count, else the one integer constant of its condition."""
    known = _TRIP_COUNT.search(attributes)
    if known:
        return int(known.group(1))
    constants = [re.search(r"constant\((\d+)\)", f"{opcode}({operands})")
                 for _, shape, opcode, operands, _ in condition if opcode == "constant" and shape.startswith("s")]
    constants = [int(c.group(1)) for c in constants if c]
    return constants[0] if len(constants) == 1 else 1  # unknown: counted once


def _multiplicities(computations: dict[str, list], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # callee -> [(caller, factor)]
    for caller, instructions in computations.items():
        for _, _, opcode, _, attributes in instructions:
            trips = 1
            if opcode == "while":
                condition = re.search(r"condition=%?([\w.\-]+)", attributes).group(1)
                trips = _trip_count(attributes, computations.get(condition, []))
            for callee in _CALLEE.findall(attributes):
                calls[callee].append((caller, trips))
            for branches in _BRANCHES.findall(attributes):
                for callee in re.findall(r"%?([\w.\-]+)", branches):
                    calls[callee].append((caller, 1))
    memo = {entry: 1}

    def times(name: str, seen=()) -> int:
        if name not in memo:
            memo[name] = sum(times(caller, seen + (name,)) * factor
                             for caller, factor in calls.get(name, []) if caller not in seen)
        return memo[name]

    return {name: times(name) for name in computations}


def _collectives(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, executions) per step of each kind of collective in `KINDS`, 0 when absent."""
    computations, entry = _parse(hlo_text)
    times = _multiplicities(computations, entry)
    shapes = {name: shape for instructions in computations.values() for name, shape, *_ in instructions}
    totals, counts = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    for computation, instructions in computations.items():
        for _, shape, opcode, operands, _ in instructions:
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            operand_bytes = sum(shape_bytes(shapes.get(name, "")) for name in re.findall(r"%([\w.\-]+)", operands))
            result_bytes = shape_bytes(shape)
            if opcode.endswith("-start") and result_bytes > operand_bytes:
                result_bytes -= operand_bytes  # async starts return (operands..., results...)
            totals[kind] += times[computation] * max(operand_bytes, result_bytes)
            counts[kind] += times[computation]
    return totals, counts


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes moved per execution of a compiled module (`compiled.as_text()`) by each kind of collective."""
    return _collectives(hlo_text)[0]


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many collectives of each kind one execution of a compiled module runs (loops: once per trip)."""
    return _collectives(hlo_text)[1]


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of every dot and ragged dot of a compiled module per execution, loops counted once per trip:
    2 * (result elements) * (contracted size) each, fused ones included. This is the matmul work one device
    does per step, which XLA's cost analysis undercounts whenever a matmul sits in a loop (micro-batches,
    the chunked LM head); element-wise work (norms, the optimizer update) is left out."""
    computations, entry = _parse(hlo_text)
    times = _multiplicities(computations, entry)
    shapes = {name: shape for instructions in computations.values() for name, shape, *_ in instructions}
    total = 0.0
    for computation, instructions in computations.items():
        for _, shape, opcode, operands, attributes in instructions:
            if opcode not in ("dot", "ragged-dot"):
                continue
            lhs = re.findall(r"%([\w.\-]+)", operands)[0]
            lhs_dims = [int(d) for d in filter(None, _ARRAY.search(shapes[lhs]).group(2).split(","))]
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes)
            contracted = 1
            for axis in filter(None, contracting.group(1).split(",") if contracting else []):
                contracted *= lhs_dims[int(axis)]
            result = 1
            for dim in filter(None, _ARRAY.search(shape).group(2).split(",")):
                result *= int(dim)
            total += times[computation] * 2.0 * result * contracted
    return total


def flops_per_device(compiled) -> float:
    """XLA's FLOP count of a compiled (partitioned) program, per device; while-loop bodies counted once."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
