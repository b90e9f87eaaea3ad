#!/usr/bin/env bash
# Builds `cnitool` (the CNI reference runtime CLI) from Debian's source package
# golang-github-appc-cni (bookworm: 1.1.2, speaks CNI up to 1.0.0) into OUTDIR/cnitool.
#
# Why from the Debian source package: the machine reaches only the Debian mirrors and PyPI, and
# cnitool needs nothing but the Go standard library, so a GOPATH build (GO111MODULE=off) works
# offline once the source is downloaded.
#
# Usage: scripts/build-cnitool.sh OUTDIR        (runs as root on Debian 12; idempotent)
# Cache: does nothing when OUTDIR/cnitool already exists and runs.
set -euo pipefail

OUTDIR=${1:?usage: build-cnitool.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [[ -x "$OUTDIR/cnitool" ]]; then
  echo "build-cnitool: $OUTDIR/cnitool exists, nothing to do" >&2
  exit 0
fi
log() { echo "build-cnitool: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive
PKG=golang-github-appc-cni

for tool in go dpkg-source; do
  if ! command -v "$tool" >/dev/null; then
    log "installing golang-go dpkg-dev"
    apt-get install -y -qq --no-install-recommends golang-go dpkg-dev >&2
    break
  fi
done

# apt-get source needs a deb-src entry. Add one (deb822, its own file) only when none exists.
SRC_FILE=/etc/apt/sources.list.d/ovs-underlay-deb-src.sources
has_deb_src() {
  grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null
}
need_update=0
if ! has_deb_src; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  log "adding deb-src for $codename in $SRC_FILE"
  cat >"$SRC_FILE" <<SRC
# Added by ovs-underlay scripts/build-cnitool.sh: source packages (to build cnitool).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi

WORK=$(mktemp -d /tmp/build-cnitool.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"  # lets apt download as _apt (sandboxed) instead of warning
cd "$WORK"
fetch() { apt-get source -qq --download-only "$PKG" >&2; }
if ((need_update)) || ! fetch 2>/dev/null; then
  log "apt-get update"
  apt-get update -qq >&2
  fetch
fi

dsc=$(ls "$WORK"/${PKG}_*.dsc | head -n1)
log "unpacking $(basename "$dsc")"
dpkg-source --no-check -x "$dsc" "$WORK/src-pkg" >/dev/null

GOPATH="$WORK/gopath"
mkdir -p "$GOPATH/src/github.com/containernetworking"
mv "$WORK/src-pkg" "$GOPATH/src/github.com/containernetworking/cni"
cd "$GOPATH/src/github.com/containernetworking/cni"
# One small patch: honour CNI_CONTAINERID (upstream derives the id from a hash of the netns path),
# so tests and the demo can name their containers and find leftovers by id.
anchor='containerID := fmt.Sprintf("cnitool-%x", s[:10])'
grep -qF "$anchor" cnitool/cnitool.go || { log "cnitool.go changed upstream: patch anchor not found"; exit 1; }
sed -i "/containerID := fmt.Sprintf(\"cnitool-%x\", s\[:10\])/a\\
\tif id := os.Getenv(\"CNI_CONTAINERID\"); id != \"\" {\\
\t\tcontainerID = id\\
\t}" cnitool/cnitool.go
grep -q 'os.Getenv("CNI_CONTAINERID")' cnitool/cnitool.go || { log "CNI_CONTAINERID patch failed"; exit 1; }
log "go build ./cnitool"
GO111MODULE=off GOPATH="$GOPATH" GOCACHE="$WORK/gocache" CGO_ENABLED=0 \
  go build -o "$OUTDIR/cnitool.tmp" ./cnitool 2>&1 | sed 's/^/build-cnitool: go: /' >&2 || true
[[ -x "$OUTDIR/cnitool.tmp" ]] || { log "go build failed"; exit 1; }
mv "$OUTDIR/cnitool.tmp" "$OUTDIR/cnitool"
log "built $OUTDIR/cnitool"
