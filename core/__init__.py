"""The shared core of ovs-underlay: what more than one program uses.

Who uses it: the CNI plugins (`cni/`), the IPAM daemon (`ipamd/`) and the node agent (`agent/`).
What lives here: the side-effect boundaries (netns handles and netns-bound sockets in `netns`,
netlink in `netlink`, OVSDB over RFC 7047 in `ovsdb` with the Open_vSwitch operations in
`vswitch` and the agent's bridges in `bridges`, ARP/NDP frames in `frames`, the host-side gateway
probe in `gateway`), what a host interface holds as plain records (`netstate`), the IPAM config
contract (`spec`), the ipamd client and its wire converters (`ipamd_client`, `wire`), the names
that mark what we own (`names`), what ADD records about an attachment for DEL, GC and the
reconciler (`attachment`), and the one judgment of what we left behind on a node (`orphans`: CNI
GC and ipamd's reconciler).

Import rules (tests/unit/test_layout.py fails on a violation):
- `core` imports neither `cni` nor `ipamd` nor `agent`;
- `agent` imports only `core` (never `cni` or `ipamd`);
- `ipamd` never imports `cni`;
- `cni` never imports ipamd's server side (allocator, stores, server, service).

Errors: everything here raises the neutral exceptions of `core.errors` (what failed, on which
object, why). Each program maps them at its edge, in one table: `cni/errors.py` to CNI codes,
`ipamd/errors.py` to gRPC status codes with a machine-readable reason.

Start-up cost: the modules that pull in a heavy library (ovsdb: ovs; ipamd_client: protobuf,
and grpc only for what the call socket does not carry) are imported by the programs only when a
verb needs them.
"""
