"""ovs-underlay-ipamd: the node-local IPAM daemon, its client and the shared IPAM spec.

`ipamd.spec` (pure) and `ipamd.client` (gRPC client) are imported by the CNI plugins;
everything else is server side and must never be imported from `cni/`.
"""
