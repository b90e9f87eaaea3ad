"""ovs-underlay CNI plugin.

Import discipline (start-up cost is a feature): modules in this package import only the
stdlib at module level. pyroute2, ovs and grpc are imported inside the boundary modules
(netlink.py, ovsdb.py, ipamd.client) that the verbs load on demand.
"""
