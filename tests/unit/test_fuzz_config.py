"""Property-based fuzzing of everything that reads a network config (issue 11 item 24).

Properties, over random JSON and over valid configs with one value replaced, deleted or added
anywhere in their tree:
- cni.netconf.parse_netconf raises nothing but CniError (which skel turns into its code);
- core.spec.parse_ipam raises nothing but ConfigError;
- cni.netconf.parse_del never raises at all (DEL cleans up by identity whatever the config);
- cni.types.Result.from_json (prevResult) raises nothing but CniError;
- cni.types.parse_cni_args raises nothing but CniError.
A TypeError, KeyError, RecursionError... escaping any of them is a 999 with a traceback for a
user. Example counts are modest (CI budget): a few seconds in all.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni.errors import CniError
from cni.netconf import parse_del, parse_netconf
from cni.types import CmdArgs, Result, parse_cni_args
from core.spec import ConfigError, parse_ipam

EXAMPLES = Path(__file__).resolve().parents[2] / "conf-examples"

# Values that have hit parsers before: wrong types, boundaries, huge and odd strings.
ODD = st.sampled_from([
    None, True, False, 0, -1, 1, 4094, 4095, 65536, 2**63, -(2**63), 1.5, float("inf"), "", " ", "x",
    "10.0.0.0/24", "10.0.0.300", "fd00::/64", "fd00::1", "10.0.0.1..10.0.0.9", "10.0.0.9-10.0.0.1",
    "0.0.0.0/0", "::/0", "/run/x.sock", "relative", "a" * 300, "\n", "\x00", "é", "%d", "../../etc",
    [], [None], [""], ["10.0.0.1"], [{}], [[]], {}, {"id": 5}, {"minID": 9, "maxID": 1},
    {"subnet": "10.0.0.0/24"}, {"dst": "0.0.0.0/0"}, {"type": "ovs-underlay-ipam"},
])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | ODD,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


def _seeds() -> list[dict[str, Any]]:
    """Every plugin config of conf-examples (conflist members too) plus a few of our own."""
    out: list[dict[str, Any]] = []
    for p in sorted(EXAMPLES.glob("*.conf*")):
        doc = json.loads(p.read_text())
        for plugin in doc.get("plugins", [doc]):
            out.append({"cniVersion": doc.get("cniVersion", "1.1.0"), "name": doc.get("name", "n"), **plugin})
    out.append({"cniVersion": "1.1.0", "name": "n1", "type": "ovs-underlay", "bridge": "br0", "vlan": 100,
                "trunk": [{"id": 5}, {"minID": 10, "maxID": 20}], "mtu": 1400,
                "runtimeConfig": {"ips": ["10.0.0.5/24"], "mac": "0a:58:0a:00:00:05"},
                "args": {"cni": {"ips": ["10.0.0.6"], "ovnPort": "p"}}, "allowPodOvnPort": True,
                "ipam": {"type": "ovs-underlay-ipam", "subnets": [
                    {"subnet": "10.0.0.0/24", "gateway": "10.0.0.1", "rangeStart": "10.0.0.5",
                     "rangeEnd": "10.0.0.50", "exclude": ["10.0.0.7..10.0.0.9"]}, "fd00::/64"],
                    "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.53"], "search": ["a.b"]},
                    "excludeIps": ["10.0.0.10"], "gatewayCheck": False, "timeoutMs": 2000},
                "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
                               "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 0}],
                               "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}], "dns": {}},
                "cni.dev/valid-attachments": [{"containerID": "c", "ifname": "eth0"}]})
    out.append({"cniVersion": "1.1.0", "name": "ovnk", "type": "ovs-underlay", "subnets": "10.1.0.0/16,fd01::/64",
                "excludeSubnets": "10.1.0.0/30"})
    return out


SEEDS = _seeds()


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with one node replaced, removed, or given an extra key."""
    conf = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    path = draw(st.sampled_from(_paths(conf)[1:]))
    parent: Any = conf
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=12) | st.sampled_from(["exclude", "vlan", "ips", "mac", "type"]))] = draw(JSON)
    else:
        parent[path[-1]] = draw(JSON)
    return conf


def _args(config: Any, command: str = "ADD", cni_args: str = "") -> CmdArgs:
    return CmdArgs(command, "c1", "/run/netns/x", "eth0", cni_args, ("/opt/cni/bin",), b"", config, "1.1.0")


def _only_cni_errors(config: dict[str, Any], cni_args: str = "") -> None:
    with contextlib.suppress(CniError):
        parse_netconf(_args(config, cni_args=cni_args))
    d = parse_del(_args(config, "DEL", cni_args))  # never raises
    assert d.name is None or isinstance(d.name, str)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated())
def test_parse_netconf_of_a_mutated_config_raises_only_cni_errors(config: dict[str, Any]) -> None:
    _only_cni_errors(config)


@FUZZ
@given(st.dictionaries(st.sampled_from(["cniVersion", "name", "type", "bridge", "vlan", "trunk", "mtu", "ipam",
                                        "subnets", "excludeSubnets", "runtimeConfig", "args", "ovnPort",
                                        "allowPodOvnPort", "ovsdbSocket", "socket_file", "prevResult",
                                        "cni.dev/valid-attachments", "ofportRequest", "datapathType"]) | st.text(),
                       JSON, max_size=8),
       st.text(max_size=40))
def test_parse_netconf_of_random_json_raises_only_cni_errors(config: dict[str, Any], cni_args: str) -> None:
    _only_cni_errors(config, cni_args)


@FUZZ
@given(mutated())
def test_parse_ipam_raises_only_config_errors(config: dict[str, Any]) -> None:
    section = config.get("ipam") if isinstance(config.get("ipam"), dict) else config
    with contextlib.suppress(ConfigError):
        parse_ipam(section)


@FUZZ
@given(st.one_of(JSON, mutated().map(lambda c: c.get("prevResult", c))))
def test_prev_result_raises_only_cni_errors(data: Any) -> None:
    with contextlib.suppress(CniError):
        Result.from_json(data, "1.1.0")


@FUZZ
@given(st.text(alphabet=st.sampled_from("=;abcIPMAC.0123456789:/ \n\t\x00é"), max_size=60))
def test_cni_args_raise_only_cni_errors(raw: str) -> None:
    with contextlib.suppress(CniError):
        parse_cni_args(raw)
