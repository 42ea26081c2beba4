"""The shipped Grafana dashboard's PromQL, with Grafana's variables replaced as Grafana would.

Shared by the promtool checks (does every expression compile?) and the live Prometheus test (does
every expression return data from a real run?)."""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "redheart.json"

# Grafana's built-in variables, replaced as Grafana would for a 1 h range at our resolution.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "1h",
    "${__range}": "1h",
}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title [refId], expression) for every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"unsubstituted Grafana variable in {panel['title']!r}: {expr}"
                found.append((f"{panel['title']} [{target.get('refId')}]", expr))

    walk(dashboard["panels"])
    return found
