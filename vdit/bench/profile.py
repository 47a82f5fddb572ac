"""Where a compiled step's time goes: a ``jax.profiler`` trace summed per HLO op.

Each op of the trace is looked up in the compiled HLO and classified by

* kind: ``matmul`` (a dot or convolution, alone or in a fusion), ``loop`` (any other
  fusion or op: elementwise work, transposes, copies, broadcasts), ``control``
  (while/call/conditional bookkeeping) or ``collective`` (all-reduce and the like: on XLA:CPU
  its time includes waiting for the other devices to arrive);
* phase, from the ``op_name`` JAX stamps on it: ``forward`` (``jvp(...)``), ``backward``
  (``transpose(...)``), ``remat`` (recomputed in the backward pass, ``rematted_computation``)
  or ``other`` (optimizer, EMA, metrics; the loss and its noise are part of the
  differentiated function, so they count as forward).

Op times are wall time per op; XLA:CPU runs independent ops concurrently, so their sum
can exceed the step time and one op's GFLOP/s can read low while a sibling runs beside it.
On several CPU devices ``runs`` also splits each traced step by device, from the
``run_id`` and ``device_ordinal`` XLA:CPU stamps on every op.
"""

from __future__ import annotations

import collections
import functools
import gzip
import json
import pathlib
import re
from typing import Callable

import jax

_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
_MATMUL = re.compile(r"\s(?:dot|convolution)\(")
_CONTROL = re.compile(r"\s(?:while|call|conditional)\(")
_RUN_KINDS = ("matmul", "loop", "collective")  # the columns of format_split's per-device lines
_COLLECTIVE = re.compile(r"\s(?:all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start|-done)?\(")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """``{instruction name: {"kind", "phase", "op_name"}}`` of a compiled module's text."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(1) in ops:
            continue
        name, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        op = " " + rest.split(", metadata=")[0]
        if _CONTROL.search(op):
            kind = "control"
        elif _COLLECTIVE.search(op):
            kind = "collective"
        elif _MATMUL.search(op) or _MATMUL.search(body):
            kind = "matmul"
        else:
            kind = "loop"
        meta = re.search(r'op_name="([^"]*)"', rest)
        op_name = meta.group(1) if meta else ""
        phase = ("remat" if "rematted_computation" in op_name else "backward" if "transpose(" in op_name
                 else "forward" if "jvp(" in op_name else "other")
        ops[name] = {"kind": kind, "phase": phase, "op_name": op_name}
    return ops


def _trace_events(trace_file: str | pathlib.Path) -> tuple[list[dict], set]:
    """A perfetto trace's events, and the pids of its accelerator processes (none on a CPU)."""
    stat = pathlib.Path(trace_file).stat()  # a rewritten file is read afresh
    return _read_trace(str(trace_file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)  # profile_step reads one trace three ways: parse it once
def _read_trace(trace_file: str, mtime_ns: int, size: int) -> tuple[list[dict], set]:
    del mtime_ns, size  # cache key only
    with gzip.open(trace_file) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    device_pids = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and re.match(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}
    return events, device_pids


def trace_op_times(trace_file: str | pathlib.Path) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and count per op of a perfetto ``*.trace.json.gz``.

    On an accelerator only the device's events count (the host's launch events would
    count each op twice), named by their ``hlo_op`` where the event carries one
    (GPU kernels are named after the kernel, not the HLO instruction).
    """
    events, device_pids = _trace_events(trace_file)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (not device_pids or e.get("pid") in device_pids):
            name = (e.get("args") or {}).get("hlo_op") or e["name"]
            total[name] += e["dur"]
            count[name] += 1
    return total, count


# GPU kernels by name, for the device events of a trace whose ops XLA ran inside command
# buffers (CUDA graphs): those events name the graph, not the HLO op.
_KERNEL_KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|^void cudnn")),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas")),
    ("copy", re.compile(r"^mem(cpy|set)|dynamic_update_slice|dynamic_slice|transpose|^copy")),
    ("reduce", re.compile(r"reduce|softmax")),
)


def kernel_kind(name: str) -> str:
    """``attention``, ``matmul``, ``copy``, ``reduce`` or ``loop`` (elementwise fusions) for a GPU kernel name."""
    return next((kind for kind, pattern in _KERNEL_KINDS if pattern.search(name)), "loop")


def device_kernel_split(trace_file: str | pathlib.Path, steps: int) -> dict[str, float]:
    """Milliseconds per step of an accelerator trace's kernels by ``kernel_kind``; {} for a CPU trace."""
    events, device_pids = _trace_events(trace_file)
    split = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("pid") in device_pids:
            split[kernel_kind(e["name"])] += e["dur"] / 1e3 / steps
    return dict(split.most_common())


def run_split(trace_file: str | pathlib.Path, ops: dict[str, dict]) -> list[dict]:
    """Each traced run of the step on each CPU device: ``{"run", "device", "span_ms", kind: ms}``.

    ``run`` counts the traced steps from 0 and ``span_ms`` is that step's wall time, first
    op to last on any device. Read from the ``run_id`` and ``device_ordinal`` that XLA:CPU
    stamps on each op event; [] for an accelerator's trace (its host events time launches).
    """
    events, device_pids = _trace_events(trace_file)
    if device_pids:
        return []
    times, spans = collections.defaultdict(collections.Counter), {}
    for e in events:
        args = e.get("args") or {}
        info = ops.get(args.get("hlo_op", ""))
        if e.get("ph") != "X" or "dur" not in e or info is None or "run_id" not in args:
            continue
        run = int(args["run_id"])
        times[run, str(args.get("device_ordinal", "0"))][info["kind"]] += e["dur"] / 1e3
        start, end = spans.get(run, (e["ts"], e["ts"] + e["dur"]))
        spans[run] = (min(start, e["ts"]), max(end, e["ts"] + e["dur"]))
    order = {run: i for i, run in enumerate(sorted(spans, key=lambda r: spans[r][0]))}
    rows = [{"run": order[run], "device": device, "span_ms": (spans[run][1] - spans[run][0]) / 1e3,
             **dict(kinds.most_common())} for (run, device), kinds in times.items()]
    return sorted(rows, key=lambda r: (r["run"], r["device"]))


def profile_step(run: Callable[[], object], hlo_text: str, directory: str | pathlib.Path, steps: int = 3,
                 top: int = 40) -> dict:
    """Traces ``steps`` calls of ``run`` (already warm) into ``directory`` and sums them per op.

    Returns ``{"steps", "trace", "split": {"phase kind": ms per step}, "kernels": {kernel
    kind: ms per step} (accelerators only), "runs": [each step on each device] (CPU only,
    see ``run_split``), "ops": [top ops]}``, each op ``{"name", "ms", "count", "kind",
    "phase", "op_name"}`` per step.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "module.hlo.txt").write_text(hlo_text)  # to read the trace's op names against later
    before = set(directory.rglob("*.trace.json.gz"))
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run())
    new = sorted(set(directory.rglob("*.trace.json.gz")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {directory}")
    total, count = trace_op_times(new[-1])
    ops = hlo_ops(hlo_text)
    rows, split = [], collections.Counter()
    for name, us in total.items():
        info = ops.get(name)
        if info is None:  # runtime events (thread pools, Python), not HLO ops
            continue
        ms = us / 1e3 / steps
        split[f"{info['phase']} {info['kind']}"] += ms
        rows.append({"name": name, "ms": ms, "count": count[name] // steps, **info})
    rows.sort(key=lambda r: -r["ms"])
    return {"steps": steps, "trace": str(new[-1]), "split": dict(split.most_common()),
            "kernels": device_kernel_split(new[-1], steps), "runs": run_split(new[-1], ops), "ops": rows[:top]}


def format_split(profile: dict) -> str:
    """One line per ``phase kind`` (and per device kernel kind) with its ms per step and share;
    on several CPU devices, also each traced step's op time by device and kind."""
    lines = []
    for title, split in (("", profile["split"]), ("kernels: ", profile.get("kernels") or {})):
        total = sum(split.values()) or 1.0
        lines += [f"{ms:9.1f} ms {100 * ms / total:5.1f}%  {title}{key}" for key, ms in split.items()]
    runs = profile.get("runs") or []
    if len({r["device"] for r in runs}) > 1:  # one line per step and device: who waited for whom
        lines.append("  step device   span ms  " + "".join(f"{k:>11s}" for k in _RUN_KINDS))
        lines += [f"  {r['run']:4d} {r['device']:>6s} {r['span_ms']:9.1f}  "
                  + "".join(f"{r.get(k, 0.0):11.1f}" for k in _RUN_KINDS) for r in runs]
    return "\n".join(lines)

