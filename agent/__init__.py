"""The node agent (`ovs-underlay-node`): bridges this node's NICs into OVS provider-network
bridges, transactionally (snapshot, apply, verify, roll back), and keeps them applied.

Import rules (tests/unit/test_layout.py): the agent imports the shared core (`core`) and never
`cni` or `ipamd`; nothing imports the agent.

Layout: `config` (the file, Kube-OVN's names), `plan` (pure: what to do, from what is observed
and journaled), `actions` (idempotent side effects as values), `engine` (journal, execute,
verify, roll back), `journal` (the durable state dir), `netmgr` (NetworkManager/networkd),
`status`, `serve`, `cli`; `drivers` names the core boundaries it runs on.
"""
