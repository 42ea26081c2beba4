"""The count of bad requests sent by every fuzz batch; last by file name so it runs after them."""

from __future__ import annotations

from collections import Counter

import pytest
from fuzz_support import (
    DETAIL,
    FINISHED,
    KNOWN_SEEN,
    MIN_BAD_REQUESTS,
    OUTCOMES,
    SKIPPED,
    STAGE_METHODS,
    STATS,
)

# ----------------------------------------------------------------------------- the count


def test_zz_at_least_1000_bad_requests_were_sent():
    expected = {
        f"{s} stage {m} [{k}]"
        for s in ("cpu", "gpu")
        for m in STAGE_METHODS
        for k in ("random", "hostile", "mutated")
    }
    expected |= {f"regret Score [{k}]" for k in ("random", "hostile", "mutated")}
    expected.add("StartRun settings + step")
    if not expected <= FINISHED:
        pytest.skip(
            f"only {len(FINISHED)} of {len(expected)} fuzz batches ran (run the whole module for the count)"
        )
    total = sum(STATS.values())
    per_service = Counter()
    for (service, _method, _strategy), n in STATS.items():
        per_service[service] += n
    lines = [
        f"bad requests sent: {total} ({dict(per_service)}); answers: {dict(OUTCOMES)}",
        f"SaveState requests not sent (would write outside the sandbox): {sum(SKIPPED.values())}",
        f"known bugs met: {dict(KNOWN_SEEN)}",
    ]
    for key in sorted(STATS):
        codes = {k[3]: n for k, n in sorted(DETAIL.items()) if k[:3] == key}
        lines.append(f"  {' '.join(key)}: {STATS[key]} {codes}")
    print("\n".join(lines))
    assert total >= MIN_BAD_REQUESTS, "\n".join(lines)
