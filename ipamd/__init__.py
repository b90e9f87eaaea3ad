"""ovs-underlay-ipamd: the node-local IPAM daemon (server side) and its admin CLI.

Import rules (tests/unit/test_layout.py): ipamd imports the shared core (`core`: the IPAM spec,
the wire contract, netns sockets, ARP/NDP frames, the ipamd client for the CLI) and never `cni`;
`cni` never imports ipamd's server side (allocator, stores, server, service). What the plugins
and the daemon share lives in `core`.
"""
