#!/usr/bin/env bash
# Builds the product bundle dist/ovs-underlay/ — the ONE build command (`make binary`, and the
# e2e tests' ensure_bundle, call this):
#   1. PyInstaller (packaging/ovs-underlay.spec): ovs-underlay-py (the Python CNI plugin),
#      ovs-underlay-ipam, ovs-underlay-ipamd and their shared _internal/;
#   2. gcc: ovs-underlay, the native warm-path client (packaging/shim/ovs-underlay-shim.c) that
#      the runtime execs; it hands the call to the warm server or execs ovs-underlay-py.
# Environment: PYTHON_BIN (default <repo>/.venv/bin, where pyinstaller lives), CC (default gcc).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-$ROOT/.venv/bin}
CC=${CC:-gcc}

# PYINSTALLER_CONFIG_DIR: --clean wipes PyInstaller's cache; keep it per checkout, not per user.
PYINSTALLER_CONFIG_DIR=$ROOT/build/pyinstaller-cache "$PYTHON_BIN/pyinstaller" --noconfirm --clean \
  --log-level WARN --distpath dist --workpath build/pyinstaller packaging/ovs-underlay.spec
"$CC" -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -o dist/ovs-underlay/ovs-underlay \
  packaging/shim/ovs-underlay-shim.c
