#!/bin/sh
# Installs the frozen bundle on a node as an immutable release and switches to it atomically.
# The one implementation behind `make install` (scripts/install.sh) and the image's install-cni
# (the DaemonSet's init container), so a node looks the same whichever way it was installed.
# POSIX sh: runs under bash on a host and under busybox ash in the image.
#
# Usage: install-bundle.sh SOURCE ROOT PREFIX CNI_BIN_DIR [EXTRA]
#   SOURCE       the bundle: ovs-underlay, ovs-underlay-py, ovs-underlay-ipam, ovs-underlay-ipam-py,
#                ovs-underlay-ipamd, ovs-underlay-node, _internal/ (dist/ovs-underlay, or /opt/ovs-underlay
#                inside the image)
#   ROOT         where the target's / is mounted: "" for this machine, $DESTDIR when packaging,
#                /host in the init container (the node's /opt mounted at /host/opt)
#   PREFIX       the bundle's path as the target sees it (/opt/ovs-underlay)
#   CNI_BIN_DIR  the runtime's plugin directory as the target sees it (/opt/cni/bin)
#   EXTRA        optional directory copied over the release (README.md, examples/)
# Environment: OVS_UNDERLAY_VERSION (names the release; default "release"); OVNK_ALIAS (1 = also
#   link CNI_BIN_DIR/ovn-k8s-cni-overlay to ovs-underlay, so ovn-kubernetes NADs run unchanged on a
#   node WITHOUT ovn-kubernetes; refused, before anything changes, over a file that is not our link).
#
# Layout on the target (PREFIX=/opt/ovs-underlay):
#   /opt/ovs-underlay.releases/<version>-<hash>/  one release per content (sha256 of the tree,
#                                                 12 hex digits); never modified once in place
#   /opt/ovs-underlay -> ovs-underlay.releases/<version>-<hash>    relative symlink
#   /opt/ovs-underlay/bin/ovs-underlay-ipamd -> ../ovs-underlay-ipamd (the systemd units' paths;
#   /opt/ovs-underlay/bin/ovs-underlay-node  -> ../ovs-underlay-node   the same for the agent)
#   /opt/cni/bin/ovs-underlay      -> /opt/ovs-underlay/ovs-underlay        (absolute: they are
#   /opt/cni/bin/ovs-underlay-ipam -> /opt/ovs-underlay/ovs-underlay-ipam    target paths)
#   /opt/cni/bin/ovn-k8s-cni-overlay -> /opt/ovs-underlay/ovs-underlay    (OVNK_ALIAS=1 only)
#
# Why this is atomic for a running node (a rolling update of the DaemonSet, a `make install`
# over a live install):
#   - a release directory appears by rename(2) of a complete copy made next to it, so it is
#     either absent or complete;
#   - PREFIX is switched by rename(2) of a new symlink over the old one: an exec sees the old
#     release or the new one, never a mix and never nothing;
#   - a process resolves its executable when it starts (/proc/self/exe), and both the native
#     client and the PyInstaller bootloader find <name>-py, _internal/ and the Python
#     archive from that resolved path, so a plugin call or daemon that started from the old
#     release reads the old release to its end;
#   - the previous release is kept (calls in flight, daemons not yet restarted); older ones and
#     staging copies abandoned for an hour are removed;
#   - the CNI_BIN_DIR links name PREFIX, so they do not change on upgrade: pods attached by the
#     old release are deleted (CNI DEL) by the new one through the same path.
set -eu

log() { echo "install-bundle: $*" >&2; }
die() { log "$*"; exit 1; }

[ $# -ge 4 ] || die "usage: install-bundle.sh SOURCE ROOT PREFIX CNI_BIN_DIR [EXTRA]"
SOURCE=$1 ROOT=$2 PREFIX=$3 CNI_BIN_DIR=$4 EXTRA=${5:-}
VERSION=${OVS_UNDERLAY_VERSION:-release}

# Paths come from the environment of an init container: absolute, no "..", no odd characters.
check_path() {
  case $2 in
    /*) ;;
    *) die "$1 must be an absolute path, got '$2'" ;;
  esac
  case $2 in
    *..* | *[!A-Za-z0-9._/+-]* | */) die "$1: refusing '$2' (.., trailing / or characters outside [A-Za-z0-9._/+-])" ;;
  esac
}
check_path PREFIX "$PREFIX"
check_path CNI_BIN_DIR "$CNI_BIN_DIR"
[ -z "$ROOT" ] || check_path ROOT "$ROOT"
case $VERSION in
  *[!A-Za-z0-9._+-]* | "") die "OVS_UNDERLAY_VERSION: refusing '$VERSION'" ;;
esac
for p in ovs-underlay ovs-underlay-py ovs-underlay-ipam ovs-underlay-ipam-py ovs-underlay-ipamd \
         ovs-underlay-node; do
  [ -x "$SOURCE/$p" ] || die "$SOURCE/$p missing: not a bundle (run \`make binary\`)"
done
[ -d "$SOURCE/_internal" ] || die "$SOURCE/_internal missing: not a bundle (run \`make binary\`)"

# The ovn-kubernetes name only ever replaces our own link: anything else there is a real
# ovn-kubernetes (hijacking it would take over every pod of the cluster network).
ovnk=$ROOT$CNI_BIN_DIR/ovn-k8s-cni-overlay
case ${OVNK_ALIAS:-0} in
  1)
    if { [ -e "$ovnk" ] || [ -L "$ovnk" ]; } && [ "$(readlink "$ovnk" || true)" != "$PREFIX/ovs-underlay" ]; then
      die "$ovnk exists and is not ours (ovn-kubernetes?): not replacing it; leave OVNK_ALIAS unset"
    fi
    ;;
  0 | "") ;;
  *) die "OVNK_ALIAS: expected 1 or 0, got '$OVNK_ALIAS'" ;;
esac

dest=$ROOT$PREFIX
name=${PREFIX##*/}
releases=$dest.releases
mkdir -p "$releases" "$ROOT$CNI_BIN_DIR"

# 1. Stage a complete copy next to the releases (same filesystem, so the rename is atomic).
staging=$releases/.staging.$$
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT
cp -a "$SOURCE" "$staging"
if [ -n "$EXTRA" ]; then cp -a "$EXTRA/." "$staging/"; fi
mkdir -p "$staging/bin"
ln -sfn ../ovs-underlay-ipamd "$staging/bin/ovs-underlay-ipamd"
ln -sfn ../ovs-underlay-node "$staging/bin/ovs-underlay-node"
chmod 755 "$staging"

# 2. Name it by its content: the same bundle installed twice is the same release. A release
#    whose files no longer match its name (edited or damaged on the node) is not reused: the
#    fresh copy goes in beside it and the damaged one is removed at a later install.
tree_hash() {
  (cd "$1" && {
    find . -type f -exec sha256sum {} + | LC_ALL=C sort -k2
    find . -type l | LC_ALL=C sort | while read -r l; do echo "link $l $(readlink "$l")"; done
  } | sha256sum | cut -c1-12)
}
digest=$(tree_hash "$staging")
release=$VERSION-$digest
if [ -d "$releases/$release" ] && [ "$(tree_hash "$releases/$release")" = "$digest" ]; then
  rm -rf "$staging"
  state=unchanged
else
  if [ -e "$releases/$release" ]; then
    log "$releases/$release does not match its content: installing a fresh copy"
    release=$release.$$
  fi
  mv -T "$staging" "$releases/$release"
  state=new
fi
trap - EXIT

# 3. Switch PREFIX to it with one rename(2).
previous=
if [ -L "$dest" ]; then
  previous=$(readlink "$dest")
  previous=${previous##*/}
elif [ -e "$dest" ]; then
  # A directory from an install that predates releases: keep it as the previous release. The
  # two renames leave PREFIX missing for a moment, once.
  previous=legacy-$$
  mv -T "$dest" "$releases/$previous"
  log "moved the old $dest to $releases/$previous"
fi
ln -sfn "$name.releases/$release" "$dest.tmp.$$"
mv -T "$dest.tmp.$$" "$dest"
log "$dest -> $name.releases/$release ($state)"

# 4. The plugins in the runtime's directory, replaced by rename as well.
for p in ovs-underlay ovs-underlay-ipam; do
  link=$ROOT$CNI_BIN_DIR/$p
  ln -sfn "$PREFIX/$p" "$link.tmp.$$"
  mv -T "$link.tmp.$$" "$link"
done
log "$ROOT$CNI_BIN_DIR/{ovs-underlay,ovs-underlay-ipam} -> $PREFIX/"
if [ "${OVNK_ALIAS:-0}" = 1 ]; then
  ln -sfn "$PREFIX/ovs-underlay" "$ovnk.tmp.$$"
  mv -T "$ovnk.tmp.$$" "$ovnk"
  log "$ovnk -> $PREFIX/ovs-underlay"
fi

# 5. Keep this release and the previous one; remove older ones and abandoned staging copies.
for r in "$releases"/* "$releases"/.staging.*; do
  [ -e "$r" ] || continue
  base=${r##*/}
  case $base in
    "$release" | "$previous") continue ;;
    .staging.*) [ -n "$(find "$r" -maxdepth 0 -mmin +60)" ] || continue ;;
  esac
  rm -rf "$r"
  log "removed old release $base"
done
