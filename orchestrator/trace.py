"""The pipeline timeline: ``--trace STEPS`` writes ``<output_dir>/trace.json`` (Chrome trace events)."""

from __future__ import annotations


def parse_steps(text: str) -> tuple[int, int]:
    """``"10-12"`` -> (10, 12); ``"5"`` -> (5, 5). Steps count from 1, as in the logs."""
    first, sep, last = str(text).strip().partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(f"{text!r} is not a step range (expected N or FIRST-LAST, e.g. 10-12)") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{text!r}: steps count from 1 and FIRST <= LAST (e.g. 10-12)")
    return lo, hi
