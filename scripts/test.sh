#!/usr/bin/env bash
# The whole test suite: install (idempotent), lint and type-check, then unit and integration
# tests that boot real QEMU guests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --no-demo
# The nested-KVM layer's outer VM (Debian's generic kernel + a busybox initramfs), cached by
# content hash under $EMBER_CACHE/nested-kvm: tests/integration/test_kvm_nested.py boots it.
echo "==> nested-KVM outer VM (tests/nested/outer.py)" >&2
.venv/bin/python -m tests.nested.outer build
echo "==> ruff" >&2
.venv/bin/ruff check ember tests benchmarks
echo "==> mypy --strict" >&2
.venv/bin/mypy
echo "==> pytest" >&2
set +e
.venv/bin/pytest -q --durations=30 "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
