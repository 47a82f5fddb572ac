"""Tables of benchmark results, for the terminal and for ``docs/performance.md``.

``render(result)`` turns one result (the JSON a ``vdit bench`` command writes) into
markdown: the machine stamp and command first, then its table. ``update_docs``
replaces each ``<!-- bench:SECTION -->`` ... ``<!-- /bench:SECTION -->`` region of a
document with the rendered results of that section, so the figures in the docs are
always the ones in the JSON files next to them, each with its machine and date.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from vdit.bench.machine import describe

SCHEMA = "vdit.bench/1"
_MIB = 2**20


def _f(x: float | None, fmt: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    return "–" if x is None else f"{x * scale:{fmt}}{suffix}"


def _flops_unit(peak: float | None) -> tuple[str, float]:
    return ("TFLOP/s", 1e-12) if (peak or 0) >= 1e12 else ("GFLOP/s", 1e-9)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(timing: dict | None) -> str:
    if not timing:
        return "not timed"
    return f"{timing['median_s']:.4g} [{timing['min_s']:.4g}–{timing['max_s']:.4g}]"


def _render_train(r: dict) -> str:
    s = r["setup"]
    unit, k = _flops_unit(s["gemm_peak"])
    d = s["dit"]
    gemm = ", ".join(f"{g['flops_per_s'] * k:.4g} {unit} ({name}, n={g['n']})" for name, g in s["gemm"].items())
    fwd = s["forward_flops"]
    total = sum(fwd.values())
    big = sorted(((v, name) for name, v in fwd.items() if v / total >= 0.01), reverse=True)
    shares = ", ".join(f"{name} {v / total:.0%}" for v, name in big)
    lines = [
        f"DiT {s['params']:,} parameters (width {d['width']}, depth {d['depth']}, {d['num_heads']} heads, MLP "
        f"{d['mlp_dim']}), {d['dtype']} matmuls, `{d['attention_impl']}` attention; {s['batch']} x latents "
        f"{tuple(s['latent_shape'])} = {s['tokens_per_step']:,} tokens/step, {s['text_len']} text tokens.",
        f"Model FLOPs {s['train_flops_per_step'] / 1e9:.4g} G/step (3 x forward; forward: {shares}). "
        f"GEMM peak: {gemm or 'not measured (untimed run)'}"
        + (f"; spec peak {s['spec_peak'] * 1e-12:.0f} TFLOP/s" if s.get("spec_peak") else "")
        + ".",
    ]
    if r.get("flop_check"):
        checks = ", ".join(f"{c['mode']} {c['ratio']:.3f}" for c in r["flop_check"])
        lines.append(f"FLOP cross-check, XLA cost_analysis / analytic (unrolled, `xla` attention): {checks}.")
    peer = r.get("peer")
    if peer:
        p = peer["parity"]
        lines.append(f"Peer: {peer['library']}, {peer['threads']} threads, {p['params_peer']:,} parameters (vdit "
                     f"{p['params_vdit']:,}); converted into vdit its outputs differ by {p['max_abs_diff']:.1e} "
                     f"(max |out| {p['max_abs_out']:.2f}).")
    # A devices column only when some step ran on several (results from before it existed have none).
    multi = any(row.get("devices", 1) > 1 for row in r["rows"])
    header = ["step", "remat", "scan", *(["devices"] if multi else []), "compile s", "step s, median [min–max]",
              "tokens/s", unit, "of GEMM peak", "MFU (spec)", "÷ diffusers", "temp MiB", "estimate MiB",
              "temp / estimate", "peak MiB"]
    rows = []
    for row in r["rows"]:
        m, e = row["memory"], row["estimate"]
        rows.append(["vdit", row["remat"], row["scan_layers"], *([row.get("devices", 1)] if multi else []),
                     _f(row["compile_s"], ".1f"), _spread(row["timing"]),
                     _f(row["tokens_per_s"], ".0f"), _f(row["model_flops_per_s"], ".4g", k),
                     _f(row["frac_gemm_peak"], ".1%"), _f(row["mfu_spec"], ".1%"), _f(row["vs_peer"], ".3g"),
                     _f(m["temp_bytes"], ".1f", 1 / _MIB), _f(e["temp_bytes"], ".1f", 1 / _MIB),
                     _f(row["temp_ratio"], ".2f"), _f(m["peak_bytes"], ".1f", 1 / _MIB)])
    if peer:
        rows.append(["diffusers", "none", "–", *(["–"] if multi else []), "–", _spread(peer["timing"]),
                     _f(peer["tokens_per_s"], ".0f"), _f(peer["model_flops_per_s"], ".4g", k), _f(peer["frac_gemm_peak"], ".1%"),
                     _f(peer["mfu_spec"], ".1%"), "1.00" if peer["step_s"] else "–", "–", "–", "–", "–"])
    return "\n".join(lines) + "\n\n" + table(header, rows) + _render_floor(r, unit, k)


def _render_floor(r: dict, unit: str, k: float) -> str:
    rows = [row for row in r["rows"] if row.get("matmul_floor")]
    if not rows:
        return ""
    peer_s = (r.get("peer") or {}).get("step_s")
    out = ["", "", "Matmul floor (`--floor`): the step's matmuls, each compiled and timed alone on random operands, "
           "summed. Where matmuls take milliseconds, far above a call's dispatch (tens of microseconds, counted in "
           "each), no rewrite of the rest of the step can go below it on this backend.", ""]
    in_torch = all("torch_seconds" in row["matmul_floor"] for row in rows)
    batched = all("batched_seconds" in row["matmul_floor"] for row in rows)  # not in results before 2026-12-06
    header = ["remat", "scan", "matmuls (distinct)", "GFLOP run", "floor s", unit, "floor / step", "floor ÷ diffusers",
              *(["same matmuls in torch s", "floor ÷ torch's"] if in_torch else []),
              *(["of which batched (attention), s" + (": XLA / torch" if in_torch else "")] if batched else []),
              "largest share: matmul, ms each x count, " + unit + ("; in torch, ms each" if in_torch else "")]
    if in_torch:
        out[-2] += (" With `--peer`, torch runs the same matmuls too (`torch.einsum` on operands of the same shapes "
                    "and dtypes): the floor on torch's GEMMs.")
    body = []
    for row in rows:
        f = row["matmul_floor"]
        worst = f["top"][0]
        body.append([row["remat"], row["scan_layers"], f"{f['count']} ({f['distinct']})", _f(f["flops"], ".1f", 1e-9),
                     _f(f["seconds"], ".4g"), _f(f["flops_per_s"], ".4g", k),
                     _f(f["seconds"] / row["step_s"] if row["step_s"] else None, ".0%"),
                     _f(f["seconds"] / peer_s if peer_s else None, ".3g"),
                     *([_f(f["torch_seconds"], ".4g"), _f(f["seconds"] / f["torch_seconds"], ".3g")] if in_torch else []),
                     *([_f(f["batched_seconds"], ".4g") + (" / " + _f(f["batched_torch_seconds"], ".4g") if in_torch
                                                             else "")] if batched else []),
                     f"`{worst['label']}`: {worst['seconds'] * 1e3:.3g} ms x {worst['count']}, "
                     f"{worst['flops_per_s'] * k:.4g}" + (f"; {worst['torch_seconds'] * 1e3:.3g}" if in_torch else "")])
    return "\n".join(out) + "\n" + table(header, body)


def _render_sample(r: dict) -> str:
    s = r["setup"]
    line = (f"{s['sampler']}, {s['steps']} steps, batch {s['batch']}, latents {tuple(s['latent_shape'])}, cfg "
            f"{s['cfg']:g}, {s['dit_dtype']} DiT, `{s['attention_impl']}` attention. Batched CFG / two passes, "
            f"per step: {_f(s['batched_over_two_pass'], '.2f')}.")
    header = ["guidance", "DiT calls x batch per step", "compile s", "loop s, median [min–max]", "model calls",
              "ms per step"]
    rows = [[row["guidance"], f"{row['dit_calls_per_step']} x {row['dit_batch']}", _f(row["compile_s"], ".1f"),
             _spread(row["timing"]), row["model_calls"], _f(row["step_s"], ".2f", 1e3)] for row in r["rows"]]
    return line + "\n\n" + table(header, rows)


def _render_vae(r: dict) -> str:
    s = r["setup"]
    line = (f"Decode of {tuple(s['video_shape'])} from latents {tuple(s['latent_shape'])} ({s['pixel_frames']:,} "
            f"pixel-frames), {s['dtype']}, base width {s['base_dim']}, weights {s['params_bytes'] / _MIB:.1f} MiB. "
            f"Chunked / whole: time {_f(s['chunked_over_whole_time'], '.2f')}, temp "
            f"{_f(s['chunked_over_whole_temp'], '.2f')}.")
    header = ["decode", "compile s", "temp MiB", "temp B per pixel-frame", "peak B per pixel-frame",
              "decode s, median [min–max]"]
    rows = [[row["mode"], _f(row["compile_s"], ".1f"), _f(row["memory"]["temp_bytes"], ".1f", 1 / _MIB),
             _f(row["temp_per_pixel_frame"], ".0f"), _f(row["peak_per_pixel_frame"], ".0f"), _spread(row["timing"])]
            for row in r["rows"]]
    return line + "\n\n" + table(header, rows)


def _render_attention(r: dict) -> str:
    s = r["setup"]
    exps = "; ".join(f"`{impl}` " + ", ".join(f"{mode} {_f(e, '.2f')}" for mode, e in modes.items())
                     for impl, modes in s["memory_exponent"].items())
    line = (f"Batch {s['batch']}, {s['heads']} heads of {s['head_dim']}, {s['dtype']}. Memory ~ S^k, k = {exps} "
            "(1 = linear).")
    unit, k = _flops_unit(max([row["flops_per_s"] or 0 for row in r["rows"]] + [0]))
    header = ["impl", "mode", "tokens", "compile s", "temp MiB", "time s, median [min–max]", unit]
    rows = [[row["impl"], row["mode"], f"{row['seq']:,}", _f(row["compile_s"], ".1f"),
             _f(row["memory"]["temp_bytes"], ".1f", 1 / _MIB), row["skipped"] or _spread(row["timing"]),
             _f(row["flops_per_s"], ".4g", k)] for row in r["rows"]]
    return line + "\n\n" + table(header, rows)


_RENDER = {"train": _render_train, "sample": _render_sample, "vae": _render_vae, "attention": _render_attention}


def render(result: dict) -> str:
    """Markdown for one result: machine stamp, command, description and table."""
    if result.get("schema") != SCHEMA or result.get("kind") not in _RENDER:
        raise ValueError(f"not a vdit benchmark result (schema {SCHEMA!r}, kind one of {sorted(_RENDER)})")
    stamp = f"*{describe(result['machine'])}*"
    return f"{stamp}\n`{result['command']}`\n\n{_RENDER[result['kind']](result)}"


def load_results(paths: Sequence[str | pathlib.Path]) -> list[dict]:
    """Reads result JSON files; a file that is not one is a one-line ValueError."""
    results = []
    for path in paths:
        try:
            result = json.loads(pathlib.Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read benchmark result {path}: {e}") from e
        if not isinstance(result, dict) or result.get("schema") != SCHEMA:
            raise ValueError(f"{path} is not a vdit benchmark result (schema {SCHEMA!r})")
        results.append(result)
    return results


def update_docs(text: str, results: Sequence[dict]) -> str:
    """``text`` with every ``<!-- bench:S -->...<!-- /bench:S -->`` region filled from the results of section S.

    Raises a ValueError naming a result's section when the document has no region for it.
    Regions with no result are left as they are.
    """
    sections: dict[str, list[dict]] = {}
    for result in results:
        sections.setdefault(result["section"], []).append(result)
    for section, items in sections.items():
        pattern = re.compile(rf"(<!-- bench:{re.escape(section)} -->\n).*?(<!-- /bench:{re.escape(section)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the document has no <!-- bench:{section} --> ... <!-- /bench:{section} --> region")
        body = "\n\n".join(render(r) for r in sorted(items, key=lambda r: r["machine"]["date"]))
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text

