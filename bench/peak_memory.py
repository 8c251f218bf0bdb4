"""What a compiled step holds at its memory peak, read from XLA's own dumps (nothing runs).

`compile_with_buffer_dump` compiles with `xla_dump_to`: XLA writes the scheduled module
(`*after_optimizations.txt`) and, for XLA:CPU, its live ranges (`*-live-range.txt`), whose
"Live ranges at T (peak)" section names every buffer alive when the heap simulator reaches its
peak, with its bytes. `analyse_peak` looks each of those buffers up in the scheduled module —
shape, opcode and the `op_name` JAX gave it (the Flax module path; `transpose(jvp(...))` marks the
backward pass) — and sorts them into kinds:

  arguments      entry parameters: the train state and the batch (the `args` of the memory analysis)
  gradients      fp32 buffers shaped like a param (in any dim order), made in the backward pass
  param copies   other buffers shaped like a param: the masters cast to the compute dtype, and
                 XLA:CPU's fp32 copies of bf16 dot/conv operands
  attention      buffers made inside an attention (its op_name is under attn1/attn2 but not under the
                 to_q/to_k/to_v/to_out_0 projections): logits, softmax, their gradients
  activations    everything else (hidden states, their gradients, norms, ...)

A buffer without an `op_name` (XLA's own fusions and broadcasts) takes the one of the fused
computation inside it, else of its first user. The kinds are sums over buffers alive at the peak;
their total is below XLA's temporaries by the allocator's fragmentation.

jax is imported inside the functions: the `jaxsd bench` parent imports this module (for `KINDS`)
and never imports jax itself — only the measuring children do.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

KINDS = ("gradients", "param copies", "attention", "activations")
_PROJECTIONS = ("/to_q", "/to_k", "/to_v", "/to_out_0")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")


def compile_with_buffer_dump(fn: Callable, args: tuple, dump_dir: str, *, donate_argnums=(),
                             compiler_options: dict | None = None):
    """AOT-compile `fn(*args)` (ShapeDtypeStructs) with XLA's HLO dumps in `dump_dir`.
    Returns (compiled, lower_s, compile_s)."""
    import jax

    options = {**(compiler_options or {}), "xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True}
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    return compiled, t1 - t0, time.perf_counter() - t1


def _tree_gb(tree: Any) -> float:
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)) / 1e9


def state_budget(state: Any) -> dict:
    """GB of a (abstract) TrainState's fields: trained params, frozen params, optimizer state, EMA."""
    return {"params_gb": _tree_gb(state.params), "frozen_gb": _tree_gb(state.frozen),
            "opt_state_gb": _tree_gb(state.opt_state), "ema_gb": _tree_gb(state.ema)}


def _dump_files(dump_dir: str) -> tuple[str, str]:
    ranges = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt")))
    if not ranges:
        raise RuntimeError(f"no *-live-range.txt in {dump_dir}: this backend's XLA does not dump live ranges")
    # the step is the largest module compiled (a dump may also hold small helper programs)
    live = max(ranges, key=os.path.getsize)
    return live, live.removesuffix("-live-range.txt") + ".txt"


def peak_buffers(live_range_text: str) -> list[tuple[str, int]]:
    """(buffer name, bytes) of every buffer in the "Live ranges at T (peak)" section."""
    m = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)(?:\n  \S|\Z)", live_range_text, re.DOTALL)
    if m is None:
        raise RuntimeError("the live-range dump has no 'Live ranges at ... (peak)' section")
    return [(name, int(size)) for name, size in re.findall(r"^\s+(\S+?)\{[^}]*\}: (\d+) bytes", m.group(1), re.MULTILINE)]


class _Module:
    """The scheduled HLO text: each instruction's shape, opcode, op_name, called computation, users."""

    def __init__(self, text: str):
        self.shape, self.opcode, self.op_name, self.calls, self.users = {}, {}, {}, {}, {}
        self.computation_op_name: dict[str, str] = {}
        self.entry_parameters: set[str] = set()
        computation, entry = None, False
        for line in text.splitlines():
            head = _COMPUTATION.match(line)
            if head and line.rstrip().endswith("{"):
                computation, entry = head.group(1), line.startswith("ENTRY")
                continue
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, rest = m.group(1), line[m.end():]
            shape, rest = _split_shape(rest)
            opcode = rest.split("(", 1)[0]
            operands = rest[len(opcode):].split("), ", 1)[0]
            self.shape[name], self.opcode[name] = shape, opcode
            if entry and opcode == "parameter":
                self.entry_parameters.add(name)
            op = re.search(r'op_name="([^"]*)"', line)
            if op:
                self.op_name[name] = op.group(1)
                self.computation_op_name.setdefault(computation, op.group(1))
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if called:
                self.calls[name] = called.group(1)
            for operand in re.findall(r"%([\w.\-]+)", operands):
                self.users.setdefault(operand, []).append(name)

    def op_name_of(self, name: str) -> str:
        """The buffer's op_name: its own, its fused computation's, or its first named user's."""
        if name in self.op_name:
            return self.op_name[name]
        if name in self.calls and self.calls[name] in self.computation_op_name:
            return self.computation_op_name[self.calls[name]]
        for user in self.users.get(name, ()):
            if user in self.op_name or (user in self.calls and self.calls[user] in self.computation_op_name):
                return self.op_name_of(user)
        return ""


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} fusion(...)' → ('f32[2,3]', 'fusion(...)'); tuple shapes kept whole."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 2:]
    shape, _, tail = rest.partition(" ")
    return re.sub(r"\{[^}]*\}$", "", shape), tail


def _dims(shape: str) -> tuple[str, tuple[int, ...]]:
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    if not m:
        return shape, ()
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def _param_like(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its 1s, dims sorted: XLA may hold a kernel's gradient in another layout
    (a conv kernel [3, 3, Cin, Cout] as [Cin, 3, 3, Cout])."""
    return tuple(sorted(d for d in shape if d != 1))


def param_layouts(shapes) -> set[tuple[int, ...]]:
    """The `_param_like` forms a param of each shape may be held in: its own dims in any order, and for a
    k×k conv kernel [k, k, Cin, Cout] also the [k²·Cin, Cout] matrix the im2col lowering multiplies by
    (jaxsd/models/im2col.py), in which its gradient is made."""
    out = set()
    for shape in shapes:
        out.add(_param_like(shape))
        if len(shape) == 4:
            out.add(_param_like((shape[0] * shape[1] * shape[2], shape[3])))
    return out


def _kind(dtype: str, dims: tuple[int, ...], op_name: str, param_shapes: set) -> str:
    backward = "transpose(" in op_name
    if _param_like(dims) in param_shapes:
        return "gradients" if dtype == "f32" and backward else "param copies"
    if ("/attn1/" in op_name or "/attn2/" in op_name) and not any(p in op_name for p in _PROJECTIONS):
        return "attention"
    return "activations"


def _short(op_name: str) -> str:
    """op_name without the jit/jvp wrappers: 'bwd up_blocks_3/attentions_0/.../attn1/reduce_max'."""
    backward = "transpose(" in op_name
    path = re.sub(r"^jit\([^)]*\)/", "", op_name)
    path = re.sub(r"(transpose\()?jvp\([^)]*\)\)?/", "", path)
    parts = [p for p in path.split("/") if p not in ("checkpoint", "rematted_computation")]
    i = 0
    while i < len(parts):  # the jvp of a remat repeats the module path: a/b/a/b/c → a/b/c
        for k in range((len(parts) - i) // 2, 0, -1):
            if parts[i:i + k] == parts[i + k:i + 2 * k]:
                del parts[i + k:i + 2 * k]
                break
        else:
            i += 1
    return ("bwd " if backward else "") + "/".join(parts)


def analyse_peak(dump_dir: str, state: Any, *, top: int = 0) -> dict:
    """The buffers alive at the compiled step's peak, by kind (module doc). state: the abstract
    TrainState (its params' shapes tell gradients and param copies apart from activations).

    Returns {"live_gb": all buffers at the peak, "arguments_gb", "kinds_gb": {kind: GB},
    "top": [{"gb", "kind", "shape", "op"}] of the `top` largest temporaries}."""
    import jax

    live_path, hlo_path = _dump_files(dump_dir)
    with open(live_path) as fh:
        buffers = peak_buffers(fh.read())
    with open(hlo_path) as fh:
        module = _Module(fh.read())
    params = [*jax.tree.leaves(state.params), *jax.tree.leaves(state.frozen)]
    param_shapes = param_layouts(p.shape for p in params)
    kinds = dict.fromkeys(KINDS, 0.0)
    arguments, rows = 0.0, []
    for name, size in buffers:
        gb = size / 1e9
        if name in module.entry_parameters:
            arguments += gb
            continue
        dtype, dims = _dims(module.shape.get(name, "?"))
        op_name = module.op_name_of(name)
        kind = _kind(dtype, dims, op_name, param_shapes)
        kinds[kind] += gb
        rows.append({"gb": gb, "kind": kind, "shape": module.shape.get(name, "?"), "op": _short(op_name) or name})
    rows.sort(key=lambda r: -r["gb"])
    return {"live_gb": arguments + sum(kinds.values()), "arguments_gb": arguments, "kinds_gb": kinds,
            "top": rows[:top]}
