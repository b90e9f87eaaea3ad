#!/usr/bin/env bash
# Installs the Debian packages ovs-underlay's build, tests and demo need, and starts Open vSwitch.
# Idempotent: installs only what is missing; safe to run on every `make`.
# Runs as root on Debian 12 (bookworm). The kernel here may lack the openvswitch module: OVS then
# runs with the userspace datapath (bridges with datapath_type=netdev).
set -euo pipefail

PKGS=(openvswitch-switch iproute2 iputils-ping tcpdump containernetworking-plugins
      golang-go dpkg-dev arping etcd-server etcd-client openssl procps psmisc kmod podman runc busybox-static gcc libc6-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-system: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# The Debian etcd package starts a system etcd on :2379; tests run their own on random ports.
systemctl disable --now etcd >/dev/null 2>&1 || true

if ! timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  echo "setup-system: starting Open vSwitch" >&2
  /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >&2 || {
    echo "setup-system: ovs-ctl start failed" >&2; exit 1; }
fi
timeout 10 ovs-vsctl --timeout=5 show >/dev/null
