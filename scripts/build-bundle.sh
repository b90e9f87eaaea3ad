#!/usr/bin/env bash
# Builds the product bundle dist/ovs-underlay/ — the ONE build command (`make binary`, and the
# e2e tests' ensure_bundle, call this):
#   1. PyInstaller (packaging/ovs-underlay.spec): ovs-underlay-py (the Python CNI plugin and
#      the warm server), ovs-underlay-ipam-py, ovs-underlay-ipamd and their shared _internal/;
#   2. gcc: ovs-underlay and ovs-underlay-ipam, the native warm-path client
#      (packaging/shim/ovs-underlay-shim.c, one source built once per name) that the runtime
#      execs; it hands the call to the warm server or execs <name>-py.
# Environment: PYTHON_BIN (default <repo>/.venv/bin, where pyinstaller lives), CC (default gcc).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-$ROOT/.venv/bin}
CC=${CC:-gcc}

# PYINSTALLER_CONFIG_DIR: --clean wipes PyInstaller's cache; keep it per checkout, not per user.
PYINSTALLER_CONFIG_DIR=$ROOT/build/pyinstaller-cache "$PYTHON_BIN/pyinstaller" --noconfirm --clean \
  --log-level WARN --distpath dist --workpath build/pyinstaller packaging/ovs-underlay.spec
for name in ovs-underlay ovs-underlay-ipam; do
  "$CC" -O2 -Wall -Wextra -Werror -D_GNU_SOURCE "-DPLUGIN_NAME=\"$name\"" -o "dist/ovs-underlay/$name" \
    packaging/shim/ovs-underlay-shim.c
done
