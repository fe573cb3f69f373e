"""How hcgen writes quantities for people: durations."""
from __future__ import annotations

__all__ = ["duration"]


def duration(seconds: float, decimals: int = 1) -> str:
    """'2.3 h' from 90 min on, else 'N min' from 90 s on, else 'N s'; minutes and seconds with `decimals`."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.{decimals}f} min" if seconds >= 90 else f"{seconds:.{decimals}f} s"
