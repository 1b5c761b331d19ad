"""Memory of the current process from /proc (Linux): resident and peak resident set size."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: peak since start or reset); -1 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS ("5" > /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
