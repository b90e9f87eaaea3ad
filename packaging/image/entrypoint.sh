#!/bin/sh
# Entry point of the ovs-underlay image (scripts/build_image.py installs it as
# /usr/local/bin/ovs-underlay-entrypoint). One image, every role of the DaemonSet:
#
#   install-cni          copy the bundle onto the node and link the plugins into its CNI
#                        directory (packaging/install-bundle.sh); the init container
#   warm [ARGS]          ovs-underlay --warm-server ARGS: the warm-path fork server
#   NAME [ARGS]          ovs-underlay-NAME ARGS, any program of the bundle (ipamd, ipam, ...
#                        and every program a later bundle adds, e.g. node -> ovs-underlay-node)
#   ovs-underlay[-NAME] [ARGS]   the same by full name
#   --version            the image's version and its plugins' --version
#   --help               this text and the programs of this image
#
# Programs are exec'd (no shell stays behind), so the container's process is the daemon itself
# and gets the runtime's SIGTERM.
set -eu

BUNDLE=/opt/ovs-underlay
# install-cni: where the node's / is mounted, and the paths as the node sees them.
HOST_ROOT=${HOST_ROOT:-/host}
PREFIX=${PREFIX:-/opt/ovs-underlay}
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}

programs() {
  for f in "$BUNDLE"/ovs-underlay*; do
    [ -f "$f" ] && [ -x "$f" ] && echo "${f##*/}"
  done
  return 0
}

usage() {
  cat <<EOF
ovs-underlay image ${OVS_UNDERLAY_VERSION:-?}: the ovs-underlay CNI plugin, its IPAM daemon and the
warm-path server for a Kubernetes DaemonSet (conf-examples/kubernetes/ in the project).

usage: ovs-underlay-entrypoint COMMAND [ARGS...]
  install-cni      install the bundle into \$HOST_ROOT\$PREFIX (now $HOST_ROOT$PREFIX) and link
                   ovs-underlay, ovs-underlay-ipam into \$HOST_ROOT\$CNI_BIN_DIR (now
                   $HOST_ROOT$CNI_BIN_DIR); atomic, safe on a live node; OVNK_ALIAS=1 also
                   links ovn-k8s-cni-overlay (nodes without ovn-kubernetes only)
  warm [ARGS]      ovs-underlay --warm-server [ARGS] (warm-path fork server)
  NAME [ARGS]      ovs-underlay-NAME [ARGS], e.g. ipamd serve --config /etc/ovs-underlay/ipamd.json
  --version        versions

programs in $BUNDLE:
EOF
  programs | sed 's/^/  /'
}

[ $# -gt 0 ] || { usage; exit 0; }
cmd=$1
shift
case $cmd in
  -h | --help | help)
    usage
    ;;
  --version | version)
    echo "ovs-underlay image ${OVS_UNDERLAY_VERSION:-?}"
    "$BUNDLE/ovs-underlay" --version
    "$BUNDLE/ovs-underlay-ipam" --version
    ;;
  install-cni)
    case ${1:-} in
      -h | --help) usage; exit 0 ;;
    esac
    [ $# -eq 0 ] || { echo "install-cni: no arguments (HOST_ROOT, PREFIX, CNI_BIN_DIR come from the environment)" >&2; exit 2; }
    [ -d "$HOST_ROOT" ] || { echo "install-cni: $HOST_ROOT is missing: mount the node's directories there" >&2; exit 1; }
    exec /bin/sh /usr/share/ovs-underlay/install-bundle.sh "$BUNDLE" "$HOST_ROOT" "$PREFIX" "$CNI_BIN_DIR"
    ;;
  warm)
    exec "$BUNDLE/ovs-underlay" --warm-server "$@"
    ;;
  *[!a-z0-9-]* | -*)
    echo "ovs-underlay-entrypoint: unknown command '$cmd' (--help lists them)" >&2
    exit 2
    ;;
  *)
    for name in "$cmd" "ovs-underlay-$cmd"; do
      if [ -f "$BUNDLE/$name" ] && [ -x "$BUNDLE/$name" ]; then
        exec "$BUNDLE/$name" "$@"
      fi
    done
    echo "ovs-underlay-entrypoint: unknown command '$cmd' (--help lists them)" >&2
    exit 2
    ;;
esac
