"""`ovs-underlay-ipam` entry point: the IPAM plugin other main plugins (macvlan, ipvlan, bridge,
ptp) exec once per attachment; it forwards to ipamd.

Imports only the stdlib and cni.skel at module level; the verbs (cni.ipam_plugin, which pulls
in netaddr and, on first use, grpc) are named by string and imported by skel only for
ADD/DEL/CHECK/STATUS/GC. VERSION imports none of them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from cni import skel

VERBS = skel.Verbs(
    add="cni.ipam_plugin:add",
    delete="cni.ipam_plugin:delete",
    check="cni.ipam_plugin:check",
    status="cni.ipam_plugin:status",
    gc="cni.ipam_plugin:gc",
    about="ovs-underlay-ipam: node-local IPAM through ipamd for any CNI main plugin",
)


def main() -> None:
    multiprocessing.freeze_support()
    from cni import usage

    code = usage.handle(VERBS, "ovs-underlay-ipam", sys.argv[1:], os.environ)
    if code is not None:
        sys.exit(code)
    from cni import warm  # warm path (stdlib only): `ovs-underlay --warm-server` serves us too

    code = warm.dispatch(VERBS, sys.argv[1:], os.environ, sys.stdin.buffer, sys.stdout,
                         plugin="ovs-underlay-ipam")
    if code is not None:
        sys.exit(code)
    sys.exit(skel.main(VERBS, env=os.environ, stdin=sys.stdin.buffer, stdout=sys.stdout))


if __name__ == "__main__":
    main()
