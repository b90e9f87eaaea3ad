#!/usr/bin/env bash
# Installs the frozen bundle (dist/ovs-underlay/, built by `make binary`).
#
# Usage: scripts/install.sh DESTDIR PREFIX CNI_BIN_DIR EXAMPLES
#   DESTDIR      staging root ("" for the live system)
#   PREFIX       bundle directory, default /opt/ovs-underlay
#   CNI_BIN_DIR  where the container runtime looks for plugins, default /opt/cni/bin
#   EXAMPLES     1 = also copy conf-examples/ to PREFIX/examples
# Environment (optional): BUNDLE (default dist/ovs-underlay), SBIN_DIR (default /usr/local/sbin),
#   SYSTEMD_DIR (default /etc/systemd/system), OVNK_ALIAS (1 = also link CNI_BIN_DIR/ovn-k8s-cni-overlay
#   to ovs-underlay, so ovn-kubernetes NADs run unchanged; refused over a real ovn-kubernetes).
#
# Layout (paths below DESTDIR; packaging/install-bundle.sh places the bundle and explains why
# every step is atomic on a live node):
#   PREFIX.releases/<version>-<hash>/    the bundle, one immutable directory per content:
#     ovs-underlay and ovs-underlay-ipam (the native warm-path client, built once per name;
#     each execs its -py program from its own real dir), ovs-underlay-py,
#     ovs-underlay-ipam-py, ovs-underlay-ipamd, ovs-underlay-node, _internal/, README.md,
#     bin/ovs-underlay-{ipamd,node} -> ../ovs-underlay-{ipamd,node}, examples/ (EXAMPLES=1)
#   PREFIX                               -> PREFIX.releases/<version>-<hash> (switched by rename)
#   CNI_BIN_DIR/ovs-underlay             -> PREFIX/ovs-underlay       (absolute symlinks: they
#   CNI_BIN_DIR/ovs-underlay-ipam        -> PREFIX/ovs-underlay-ipam   name paths on the target)
#   SBIN_DIR/ovs-underlay-ipamd          -> PREFIX/ovs-underlay-ipamd
#   SBIN_DIR/ovs-underlay-node           -> PREFIX/ovs-underlay-node
#   CNI_BIN_DIR/ovn-k8s-cni-overlay      -> PREFIX/ovs-underlay       (OVNK_ALIAS=1 only; made, and
#                                        refused over a real ovn-kubernetes, by install-bundle.sh)
#   /etc/ovs-underlay/ipamd.json         (only when absent: an edited config is never replaced)
#   SYSTEMD_DIR/ovs-underlay-{ipamd,warm,node}.service (not enabled)
#
# Symlinks work because the PyInstaller bootloader finds _internal/ from the resolved path of
# the running executable (/proc/self/exe), not from argv[0], and the native client finds
# its -py program the same way.
set -euo pipefail

DESTDIR=${1-}
PREFIX=${2:-/opt/ovs-underlay}
CNI_BIN_DIR=${3:-/opt/cni/bin}
EXAMPLES=${4:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=${BUNDLE:-$ROOT/dist/ovs-underlay}
SBIN_DIR=${SBIN_DIR:-/usr/local/sbin}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}

log() { echo "install: $*" >&2; }

extra=$(mktemp -d)
trap 'rm -rf "$extra"' EXIT
install -m 0644 "$ROOT/README.md" "$extra/README.md"
if [[ "$EXAMPLES" == 1 ]]; then
  cp -a "$ROOT/conf-examples" "$extra/examples"
fi
OVS_UNDERLAY_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1) \
  sh "$ROOT/packaging/install-bundle.sh" "$BUNDLE" "$DESTDIR" "$PREFIX" "$CNI_BIN_DIR" "$extra"

mkdir -p "$DESTDIR$SBIN_DIR"
for prog in ovs-underlay-ipamd ovs-underlay-node; do
  ln -sfn "$PREFIX/$prog" "$DESTDIR$SBIN_DIR/.$prog.tmp.$$"
  mv -fT "$DESTDIR$SBIN_DIR/.$prog.tmp.$$" "$DESTDIR$SBIN_DIR/$prog"
  log "$DESTDIR$SBIN_DIR/$prog -> $PREFIX/$prog"
done

# ipamd's config: the unit points at it. Never overwrite one the operator has edited.
conf_dir="$DESTDIR/etc/ovs-underlay"
if [[ ! -e "$conf_dir/ipamd.json" ]]; then
  install -d -m 0755 "$conf_dir"
  install -m 0644 "$ROOT/conf-examples/ipamd.json" "$conf_dir/ipamd.json"
  log "ipamd config -> $conf_dir/ipamd.json"
fi

# The daemon, the (optional) warm-path server and the node agent. Enabling them is the
# operator's call (the agent also needs /etc/ovs-underlay/provider-networks.yaml, written by the
# operator: bridging a NIC is never a side effect of installing).
for name in ovs-underlay-ipamd ovs-underlay-warm ovs-underlay-node; do
  unit="$ROOT/conf-examples/$name.service"
  [[ -f "$unit" ]] || continue
  mkdir -p "$DESTDIR$SYSTEMD_DIR"
  install -m 0644 "$unit" "$DESTDIR$SYSTEMD_DIR/$name.service"
  log "systemd unit -> $DESTDIR$SYSTEMD_DIR/$name.service"
done
if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload || true
fi
