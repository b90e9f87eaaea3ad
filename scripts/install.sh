#!/usr/bin/env bash
# Installs the frozen bundle (dist/ovs-underlay/, built by `make binary`).
#
# Usage: scripts/install.sh DESTDIR PREFIX CNI_BIN_DIR EXAMPLES
#   DESTDIR      staging root ("" for the live system)
#   PREFIX       bundle directory, default /opt/ovs-underlay
#   CNI_BIN_DIR  where the container runtime looks for plugins, default /opt/cni/bin
#   EXAMPLES     1 = also copy conf-examples/ to PREFIX/examples
# Environment (optional): BUNDLE (default dist/ovs-underlay), SBIN_DIR (default /usr/local/sbin),
#   SYSTEMD_DIR (default /etc/systemd/system).
#
# Layout (paths below DESTDIR):
#   PREFIX/{ovs-underlay,ovs-underlay-py,ovs-underlay-ipam,ovs-underlay-ipamd,_internal/}   the bundle
#     (ovs-underlay is the native warm-path client; it execs ovs-underlay-py from its own real dir)
#   PREFIX/bin/ovs-underlay-ipamd        -> ../ovs-underlay-ipamd
#   CNI_BIN_DIR/ovs-underlay             -> PREFIX/ovs-underlay       (relative symlink)
#   CNI_BIN_DIR/ovs-underlay-ipam        -> PREFIX/ovs-underlay-ipam  (relative symlink)
#   SBIN_DIR/ovs-underlay-ipamd          -> PREFIX/ovs-underlay-ipamd (relative symlink)
#   SYSTEMD_DIR/ovs-underlay-ipamd.service, ovs-underlay-warm.service (not enabled)
#   PREFIX/examples/                     (EXAMPLES=1)
#
# Symlinks work because the PyInstaller bootloader finds _internal/ from the resolved path of
# the running executable (/proc/self/exe), not from argv[0], and the native client finds
# ovs-underlay-py the same way. They are relative so that a
# DaemonSet init container that mounts the host's /opt under /host/opt makes links that resolve
# on the host. The bundle is replaced by rename, so running plugin processes keep their files.
set -euo pipefail

DESTDIR=${1-}
PREFIX=${2:-/opt/ovs-underlay}
CNI_BIN_DIR=${3:-/opt/cni/bin}
EXAMPLES=${4:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=${BUNDLE:-$ROOT/dist/ovs-underlay}
SBIN_DIR=${SBIN_DIR:-/usr/local/sbin}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}
PROGRAMS=(ovs-underlay ovs-underlay-py ovs-underlay-ipam ovs-underlay-ipamd)

log() { echo "install: $*" >&2; }
die() { log "$*"; exit 1; }

for p in "${PROGRAMS[@]}"; do
  [[ -x "$BUNDLE/$p" ]] || die "$BUNDLE/$p missing: run \`make binary\` first"
done
[[ -d "$BUNDLE/_internal" ]] || die "$BUNDLE/_internal missing: run \`make binary\` first"

dest=$DESTDIR$PREFIX
mkdir -p "$(dirname "$dest")"
staging=$(mktemp -d "$dest.new.XXXXXX")
trap 'rm -rf "$staging"' EXIT
cp -a "$BUNDLE/." "$staging/"
mkdir -p "$staging/bin"
ln -s ../ovs-underlay-ipamd "$staging/bin/ovs-underlay-ipamd"
if [[ "$EXAMPLES" == 1 ]]; then
  mkdir -p "$staging/examples"
  cp -a "$ROOT/conf-examples/." "$staging/examples/"
fi
chmod 755 "$staging"
if [[ -e "$dest" ]]; then
  old="$dest.old.$$"
  mv "$dest" "$old"
  mv "$staging" "$dest"
  rm -rf "$old"
else
  mv "$staging" "$dest"
fi
trap - EXIT
log "bundle -> $dest"

link() {  # link TARGET LINKNAME: relative symlink, replaced atomically
  mkdir -p "$(dirname "$2")"
  ln -sfnr "$1" "$2.tmp.$$"
  mv -fT "$2.tmp.$$" "$2"
  log "$2 -> $(readlink "$2")"
}
link "$dest/ovs-underlay" "$DESTDIR$CNI_BIN_DIR/ovs-underlay"
link "$dest/ovs-underlay-ipam" "$DESTDIR$CNI_BIN_DIR/ovs-underlay-ipam"
link "$dest/ovs-underlay-ipamd" "$DESTDIR$SBIN_DIR/ovs-underlay-ipamd"

# ipamd's config: the unit points at it. Never overwrite one the operator has edited.
conf_dir="$DESTDIR/etc/ovs-underlay"
if [[ ! -e "$conf_dir/ipamd.json" ]]; then
  install -d -m 0755 "$conf_dir"
  install -m 0644 "$ROOT/conf-examples/ipamd.json" "$conf_dir/ipamd.json"
  log "ipamd config -> $conf_dir/ipamd.json"
fi
install -m 0644 "$ROOT/README.md" "$dest/README.md"

# The daemon and the (optional) warm-path server. Enabling them is the operator's call.
for name in ovs-underlay-ipamd ovs-underlay-warm; do
  unit="$ROOT/conf-examples/$name.service"
  [[ -f "$unit" ]] || continue
  mkdir -p "$DESTDIR$SYSTEMD_DIR"
  install -m 0644 "$unit" "$DESTDIR$SYSTEMD_DIR/$name.service"
  log "systemd unit -> $DESTDIR$SYSTEMD_DIR/$name.service"
done
if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload || true
fi
