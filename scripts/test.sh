#!/usr/bin/env bash
# The whole test suite: install (idempotent), lint and type-check, then unit and integration
# tests that boot real QEMU guests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --no-demo
echo "==> ruff" >&2
.venv/bin/ruff check ember tests benchmarks
echo "==> mypy --strict" >&2
.venv/bin/mypy
echo "==> pytest" >&2
set +e
.venv/bin/pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
