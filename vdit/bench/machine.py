"""Where and when a benchmark ran: device, CPU, library versions, date and machine load.

Absolute numbers only mean something next to this stamp, so every result carries it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import time

import jax

# Dense bf16 peak FLOP/s from vendor spec sheets, matched in order against JAX's
# ``device_kind`` (first match wins, so the specific names come first).
SPEC_PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)
_PACKAGES = ("jax", "jaxlib", "flax", "torch", "diffusers")


def spec_peak(device_kind: str, dtype: str) -> float | None:
    """Spec-sheet dense peak FLOP/s of ``device_kind`` in ``dtype``; None if unknown (CPUs, f32)."""
    if dtype != "bfloat16":
        return None
    return next((peak for name, peak in SPEC_PEAK_BF16 if name in device_kind), None)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's description)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on: the size of XLA:CPU's thread pool, and torch's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that set the numbers (None when not installed)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version() -> str | None:
    """``$VDIT_CODE_VERSION`` when set (a copied tree, whose .git may be stale or absent);
    else the git commit of the vdit checkout that runs, ``+dirty`` when its code or configs
    have uncommitted changes; None outside a git checkout (an installed wheel)."""
    if os.environ.get("VDIT_CODE_VERSION"):
        return os.environ["VDIT_CODE_VERSION"]
    root = pathlib.Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--", "vdit", "configs").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by all processes over the next ``seconds`` (from ``/proc/stat``; None elsewhere).

    Unlike the load average, which still counts a process that ended a minute ago,
    this sees only what runs now: back-to-back benchmarks do not mark each other busy.
    """

    def sample():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * cpu_cores(), 2)


def machine_info() -> dict:
    """The stamp of a run: device, CPU, memory, versions, UTC date, and the load before it started.

    ``busy`` is set when other work kept at least half the cores busy as the run began
    (measured over one second from ``/proc/stat``; the 1-minute load average where that
    is missing): its timings are suspect.
    """
    device = jax.devices()[0]
    cores = cpu_cores()
    load = load_average()
    busy_cores = cpu_busy_cores()
    in_use = busy_cores if busy_cores is not None else load
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gib": mem_gib,
        "versions": versions(),
        "code": code_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load,
        "busy_cores_before": busy_cores,
        "busy": in_use is not None and in_use >= cores / 2,
    }


def describe(machine: dict) -> str:
    """One line naming the machine, versions, date and load of a result's stamp."""
    v = machine["versions"]
    if machine["backend"] == "cpu":
        where = f"{machine['cpu']}, {machine['cores']} cores"
    else:
        where = f"{machine['device_kind']} ({machine['backend']}), host {machine['cpu']}"
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "torch", "diffusers") if v.get(k))
    if machine.get("code"):
        libs = f"vdit {machine['code']}, {libs}"
    load = machine.get("load_before")
    state = ""
    if load is not None:
        state = f"; load {load:g} before, {machine.get('load_after', float('nan')):g} after"
        if machine.get("busy_cores_before") is not None:
            state += f", {machine['busy_cores_before']:g} cores busy at start"
        state += " (**busy machine**)" if machine.get("busy") else ""
    note = f"; {machine['note']}" if machine.get("note") else ""
    return f"{where}; {libs}; {machine['date']}{state}{note}"
