"""`ovs-underlay` entry point: the frozen binary runs this once per pod.

Imports only the stdlib and cni.skel/cni.errors at module level; the verbs module
(cni.plugin, which pulls in ovs/grpc through its drivers) is named by string and
imported by skel only for ADD/DEL/CHECK/STATUS/GC. VERSION imports none of them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from cni import skel

VERBS = skel.Verbs(
    add="cni.plugin:add",
    delete="cni.plugin:delete",
    check="cni.plugin:check",
    status="cni.plugin:status",
    gc="cni.plugin:gc",
    about="ovs-underlay: veth into an Open vSwitch bridge (VLAN access/trunk) for underlay pods",
)


def main() -> None:
    multiprocessing.freeze_support()
    from cni import usage

    code = usage.handle(VERBS, "ovs-underlay", sys.argv[1:], os.environ, warm=True)
    if code is not None:
        sys.exit(code)
    from cni import warm  # warm path (stdlib only): hand the call to the warm server

    if sys.argv[1:2] == [warm.SERVE_FLAG]:  # the server, for both plugins
        from cni import ipam_main, warm_server

        sys.exit(warm_server.serve_main({"ovs-underlay": VERBS, "ovs-underlay-ipam": ipam_main.VERBS},
                                        sys.argv[2:]))
    code = warm.dispatch(VERBS, sys.argv[1:], os.environ, sys.stdin.buffer, sys.stdout)
    if code is not None:
        sys.exit(code)
    sys.exit(skel.main(VERBS, env=os.environ, stdin=sys.stdin.buffer, stdout=sys.stdout))


if __name__ == "__main__":
    main()
