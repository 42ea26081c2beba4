#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# promtool and a real Prometheus server are used by the observability tests (Debian package).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's prometheus package (promtool + server) for the observability tests"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a system service we do not want; the tests start their own server.
        (service prometheus stop || systemctl stop prometheus || pkill -x prometheus) >/dev/null 2>&1 || true
    else
        echo "warning: promtool/prometheus not installed and not root: those tests will be skipped" >&2
    fi
fi
# The generated protobuf modules must match the .proto contracts.
.venv/bin/redheart-gen-protos --check
# Lint and formatting (configured in pyproject.toml) before the suite, so style drift fails fast.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# No hand-written module over 500 lines, no function over 80 without a "# long:" comment saying why.
.venv/bin/python scripts/check_sizes.py
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
