"""The CNI edge: the `ovs-underlay` plugin and the `ovs-underlay-ipam` IPAM plugin.

Import rules (tests/unit/test_layout.py): cni imports the shared core (`core`) and never ipamd's
server side (allocator, stores, server, service); nothing in `core` or `ipamd` imports `cni`.
Failures of the core come as neutral `core.errors` exceptions; cni/errors.py maps them to CNI
codes in one table, and skel writes the error.

Import discipline (start-up cost is a feature): modules in this package import only the stdlib
(and light core modules) at module level. ovs and grpc are imported inside the core
boundary modules (core.vswitch, core.ipamd_client) that the verbs load on demand.
"""
