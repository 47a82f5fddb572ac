"""The matmul floor of a step: every matmul it runs, each compiled and timed alone, summed.

A step cannot be faster than its matmuls on the same backend, so the floor bounds what
any rewrite of the rest (norms, softmax, fusion, scheduling) can gain, and shows the
matmuls a remat policy recomputes. The matmuls are read from the step's jaxpr (scan
bodies counted once per iteration, remat recomputation and custom-VJP backward passes
included) and timed round-robin, as ``dot_general``s of the same shapes, dtypes and
dimension numbers on random operands. Each runs on the whole device alone, and each
call's dispatch (tens of microseconds) is in its time: the floor bounds steps whose
matmuls take milliseconds; on tiny models dispatch dominates and it exceeds the step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from vdit.bench.timing import measure_interleaved


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One distinct ``dot_general`` of a step: operand shapes and dtypes, dimension numbers."""

    lhs: tuple[tuple[int, ...], str]
    rhs: tuple[tuple[int, ...], str]
    dimension_numbers: Any
    preferred_element_type: str | None

    @property
    def flops(self) -> int:
        """2 x output elements x contracted length."""
        (lhs_c, _), (lhs_b, _) = self.dimension_numbers
        shape = self.lhs[0]
        contracted = int(np.prod([shape[i] for i in lhs_c]))
        out = jax.eval_shape(self.fn, *self._abstract())
        return 2 * int(np.prod(out.shape)) * contracted

    @property
    def fn(self) -> Callable:
        """``lax.dot_general`` with this matmul's dimension numbers and output type: ``fn(lhs, rhs)``."""
        pet = None if self.preferred_element_type is None else jnp.dtype(self.preferred_element_type)
        return functools.partial(jax.lax.dot_general, dimension_numbers=self.dimension_numbers,
                                 preferred_element_type=pet)

    def _abstract(self):
        return tuple(jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in (self.lhs, self.rhs))

    @property
    def batched(self) -> bool:
        """Whether the matmul has batch axes (in a DiT: attention's, per example and head)."""
        return bool(self.dimension_numbers[1][0])

    def einsum_spec(self) -> str:
        """The ``einsum`` of this matmul (``"abc,acd->abd"``): output axes in ``dot_general``'s
        order (batch, then the free axes of lhs, then of rhs), for running it elsewhere."""
        (lc, rc), (lb, rb) = self.dimension_numbers
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lhs = [next(letters) for _ in self.lhs[0]]
        rhs = [None] * len(self.rhs[0])
        for i, j in zip((*lc, *lb), (*rc, *rb)):
            rhs[j] = lhs[i]
        rhs = [a or next(letters) for a in rhs]
        free_l = [a for i, a in enumerate(lhs) if i not in (*lc, *lb)]
        free_r = [a for j, a in enumerate(rhs) if j not in (*rc, *rb)]
        out = [lhs[i] for i in lb] + free_l + free_r
        return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"

    def label(self) -> str:
        """Operand dtypes and shapes with the contracted and batch axes, for tables and logs."""
        (lc, rc), (lb, rb) = self.dimension_numbers
        return (f"{self.lhs[1]}{list(self.lhs[0])} x {self.rhs[1]}{list(self.rhs[0])}, contract {list(lc)}/{list(rc)}"
                + (f", batch {list(lb)}/{list(rb)}" if lb else ""))


def step_matmuls(fn: Callable, *args) -> collections.Counter:
    """The ``dot_general``s ``fn(*args)`` runs: a Counter of ``Matmul`` -> times per call.

    Traces ``fn`` (nothing runs). Sub-jaxprs of any primitive (jit, remat, custom VJPs,
    cond branches) are walked; a scan body counts ``length`` times. A ``while`` loop's trip
    count is unknown when tracing, so its matmuls count once.
    """
    counts: collections.Counter = collections.Counter()

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                pet = eqn.params.get("preferred_element_type")
                counts[Matmul((tuple(lhs.shape), str(lhs.dtype)), (tuple(rhs.shape), str(rhs.dtype)),
                              eqn.params["dimension_numbers"], None if pet is None else str(jnp.dtype(pet)))] += times
            inner = times * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return counts


def matmul_floor(fn: Callable, *args, warmup: int = 1, repeats: int = 5, top: int = 8) -> dict:
    """Times every distinct matmul of ``fn(*args)`` alone and sums them, each times its count.

    Returns:
      ``{"seconds", "flops" (all matmul FLOPs run, recomputation included), "count",
      "distinct", "flops_per_s", "batched_seconds" (the part in matmuls with batch axes:
      a DiT's attention scores and outputs), "top"}``; ``top`` lists the ``top`` matmuls taking the
      most of the floor: ``label``, ``count``, ``seconds`` (each), ``flops_per_s``.
    """
    counts = step_matmuls(fn, *args)
    if not counts:
        raise ValueError("the step runs no matmul: there is no matmul floor to measure")
    rng = np.random.default_rng(0)
    runs = {}
    for i, mm in enumerate(counts):
        operands = [jnp.asarray(rng.standard_normal(s, np.float32), d) for s, d in (mm.lhs, mm.rhs)]
        runs[i] = functools.partial(jax.jit(mm.fn), *operands)
    timings = measure_interleaved(runs, warmup=warmup, repeats=repeats)
    rows = []
    for i, (mm, n) in enumerate(counts.items()):
        each = timings[i].median
        rows.append({"label": mm.label(), "count": n, "seconds": each, "flops": mm.flops,
                     "flops_per_s": mm.flops / each, "batched": mm.batched})
    rows.sort(key=lambda r: -r["seconds"] * r["count"])
    seconds = sum(r["seconds"] * r["count"] for r in rows)
    flops = sum(r["flops"] * r["count"] for r in rows)
    return {"seconds": seconds, "flops": flops, "count": sum(counts.values()), "distinct": len(counts),
            "flops_per_s": flops / seconds,
            "batched_seconds": sum(r["seconds"] * r["count"] for r in rows if r["batched"]),
            "top": [{k: r[k] for k in ("label", "count", "seconds", "flops_per_s")} for r in rows[:top]]}


def add_torch_floor(floor: dict, fn: Callable, *args, threads: int, warmup: int = 1, repeats: int = 5) -> dict:
    """Adds to ``floor`` (``matmul_floor(fn, *args)``'s result) the same matmuls' floor in torch.

    Each distinct matmul runs as ``torch.einsum`` (``vdit.bench.peer.torch_matmul_times``),
    so the two floors differ only in the GEMMs: XLA's against torch's (oneDNN on a CPU).
    Call it after every XLA floor of a run: torch's worker threads keep spinning after a
    call, which slows an XLA matmul timed right after it.

    Adds ``torch_seconds`` (the floor in torch), ``batched_torch_seconds`` and, to each
    ``top`` matmul, its ``torch_seconds`` (each); returns ``floor``.
    """
    from vdit.bench.peer import torch_matmul_times

    counts = step_matmuls(fn, *args)
    times = dict(zip((mm.label() for mm in counts),
                     torch_matmul_times(list(counts), threads=threads, warmup=warmup, repeats=repeats)))
    floor["torch_seconds"] = sum(times[mm.label()] * n for mm, n in counts.items())
    floor["batched_torch_seconds"] = sum(times[mm.label()] * n for mm, n in counts.items() if mm.batched)
    for row in floor["top"]:
        row["torch_seconds"] = times[row["label"]]
    return floor
