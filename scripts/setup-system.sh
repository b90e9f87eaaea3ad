#!/usr/bin/env bash
# Installs the Debian packages ovs-underlay's build, tests and demo need, and starts Open vSwitch.
# Idempotent: installs only what is missing; safe to run on every `make`.
# Runs as root on Debian 12 (bookworm). The kernel here may lack the openvswitch module: OVS then
# runs with the userspace datapath (bridges with datapath_type=netdev).
set -euo pipefail

# ovn-central/ovn-host: the OVN tests (testbed/ovnbed.py) run their own NB/SB, northd and
# ovn-controller on private nodes; the packaged services must never start (an ovn-controller on
# the system OVS would claim it and make br-int there).
PKGS=(openvswitch-switch iproute2 iputils-ping tcpdump containernetworking-plugins
      golang-go dpkg-dev arping etcd-server etcd-client openssl procps psmisc kmod podman runc busybox-static gcc libc6-dev
      ovn-central ovn-host)
SERVICES=(etcd ovn-central ovn-host ovn-northd ovn-controller ovn-ovsdb-server-nb ovn-ovsdb-server-sb)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-system: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Debian's way to keep a package's services from starting at install: policy-rc.d answers
  # 101 (invoke-rc.d and deb-systemd-invoke both ask it). Ours only if there is none already.
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Packaged daemons the tests replace with their own (etcd on :2379, OVN): stopped and disabled,
# in case an earlier install started them.
for svc in "${SERVICES[@]}"; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
# Without systemd: the packaged daemons' pidfiles (the tests' own daemons keep theirs elsewhere).
[[ -e /var/run/ovn/ovn-controller.pid ]] && { /usr/share/ovn/scripts/ovn-ctl stop_controller >/dev/null 2>&1 || true; }
[[ -e /var/run/ovn/ovn-northd.pid ]] && { /usr/share/ovn/scripts/ovn-ctl stop_northd >/dev/null 2>&1 || true; }

if ! timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  echo "setup-system: starting Open vSwitch" >&2
  /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >&2 || {
    echo "setup-system: ovs-ctl start failed" >&2; exit 1; }
fi
timeout 10 ovs-vsctl --timeout=5 show >/dev/null
