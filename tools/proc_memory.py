"""Resident-set figures of this process from ``/proc/self`` (Linux), for the tools' memory columns.

``reset_peak()`` sets the peak (``VmHWM``) back to the current resident set, so
``status_bytes("VmHWM")`` afterwards is the peak of what ran in between.
``in_fresh_process`` runs one measurement in its own interpreter (each peak its own) and
``depth_sweep`` drives the LLM scale tools' table of depths.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

__all__ = ["status_bytes", "reset_peak", "in_fresh_process", "depth_sweep"]


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def in_fresh_process(command: list[str], what: str) -> dict:
    """Run ``command`` (a tool's own ``--measure`` mode) and return the JSON object its last output line holds."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def depth_sweep(layers: str, run_depth: Callable[[int], dict], seconds_key: str, json_path: str | None) -> list[dict]:
    """``run_depth`` for each of the comma-separated ``layers``, a progress line each, the rows also written to
    ``json_path`` when given."""
    rows = []
    for depth in (int(n) for n in layers.split(",")):
        rows.append(run_depth(depth))
        print(f"  {depth} layers: {rows[-1][seconds_key]:.1f} s", flush=True)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(rows, out, indent=1)
    return rows
