#!/usr/bin/env bash
# Install ember and everything it needs on a Debian 12 host (as root), build the guest kernel
# and the default template, then run a real sandbox. Idempotent: a second run only checks.
#   scripts/install.sh            full install + demo sandbox
#   scripts/install.sh --no-demo  install and build, no demo
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEMO=1
[ "${1:-}" = "--no-demo" ] && DEMO=0

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "run as root (ember builds images and starts VMs)" >&2; exit 1; }

APT_PACKAGES=(
  qemu-system-x86 qemu-utils            # the microVM engine
  crun runsc                            # isolation tiers: container (crun), gvisor (runsc)
  python3 python3-venv                  # ember itself and the guest agent's runtime
  patchelf                              # makes the agent runtime self-contained
  debootstrap e2fsprogs                 # Debian templates, ext4 images
  linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc xz-utils cpio  # guest kernel
  busybox-static docker-registry        # test fixtures: busybox OCI image, local registry
  strace                                # ember bench: host syscalls of each tier
  nftables iproute2 dnsmasq-base        # sandbox networks: egress policy, NAT, per-sandbox DNS
  redis-server util-linux               # ember cluster: the head's GCS state; its tests' namespaces
  ca-certificates
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  [ "${p:0:1}" = "#" ] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  say "creating virtualenv .venv (Debian's python3)"
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.ember-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "pip install -e .[dev,cluster]"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,cluster]'
  touch "$stamp"
fi
ln -sf "$REPO/.venv/bin/ember" /usr/local/bin/ember
# The oldest e2b SDK release the tests drive too (2.7.0, the first with E2B_SANDBOX_URL),
# in a venv of its own next to ember's caches (tests/integration/test_e2b.py finds it there)
OLD_E2B="${EMBER_CACHE:-/var/lib/ember/cache}/e2b-sdk-2.7.0"
if ! "$OLD_E2B/bin/python" -c 'import importlib.metadata as m; assert m.version("e2b") == "2.7.0"' 2>/dev/null; then
  say "a virtualenv with e2b 2.7.0 for the tests: $OLD_E2B"
  rm -rf "$OLD_E2B"
  mkdir -p "$(dirname "$OLD_E2B")"
  /usr/bin/python3 -m venv "$OLD_E2B"
  "$OLD_E2B/bin/pip" install -q 'e2b==2.7.0'
fi

EMBER=.venv/bin/ember
say "ember doctor"
$EMBER doctor || true
say "building the guest kernel (cached by content hash; ~4 min the first time)"
$EMBER kernel build
# --force: re-register it when ember's agent changed (same recipe: a cache hit, instant)
say "building the default template debian-python (debootstrap; cached by recipe)"
$EMBER image build debian-python --force
say "building E2B's code interpreter template code-interpreter-v1 (Jupyter from Debian; cached by recipe)"
$EMBER image build code-interpreter-v1 --force
say "booting debian-python once (ember image check)"
$EMBER image check debian-python

if [ "$DEMO" = 1 ]; then
  say "running a real sandbox: ember run -- python3 -c ..."
  $EMBER run -- python3 -c 'import platform, os; print("hello from", platform.node(), "kernel", platform.release(), "cpus", os.cpu_count())'
fi
say "ember is installed: try 'ember run -- python3 -c \"print(6*7)\"'"
