"""Resident-set figures of this process from ``/proc/self`` (Linux), for the tools' memory columns.

``reset_peak()`` sets the peak (``VmHWM``) back to the current resident set, so
``status_bytes("VmHWM")`` afterwards is the peak of what ran in between.
"""

from __future__ import annotations

__all__ = ["status_bytes", "reset_peak"]


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
