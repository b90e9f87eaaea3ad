"""Phase breakdown of one in-process ADD (run as a subprocess with the CNI env and config on
stdin): import time of the ADD code, then the verb under cProfile, then a DEL.

The plugin logs no phase timings, so phases are read from the profile: the cumulative time of
the driver methods each phase consists of. Prints one JSON document on stdout.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

PHASES = {  # phase -> (module file suffix, function name)
    "parse config": ("cni/netconf.py", "parse_netconf"),
    "OVSDB connect+preflight": ("cni/plugin.py", "preflight_bridge"),
    "netlink veth": ("core/netlink.py", "create_veth"),
    "OVSDB add port": ("core/vswitch.py", "add_port"),
    "ipamd Allocate sent (before the veth)": ("core/ipamd_client.py", "start_allocate"),
    "ipamd Allocate answer awaited": ("core/ipamd_client.py", "result"),
    "netlink addresses+routes": ("core/netlink.py", "configure"),
    "gateway probe RPC": ("cni/ipam.py", "gateway_check"),
    "announce (GARP/NA)": ("core/netlink.py", "announce"),
    "drivers close": ("cni/drivers.py", "close"),
    "whole verb (skel.main)": ("cni/skel.py", "main"),
}


def main() -> None:
    t0 = time.perf_counter()
    from cni import skel
    from cni.__main__ import VERBS

    t1 = time.perf_counter()
    import cni.plugin  # noqa: F401
    import core.ipamd_client  # noqa: F401
    from core import netlink, vswitch  # noqa: F401

    t2 = time.perf_counter()
    data = sys.stdin.buffer.read()
    env = dict(os.environ)
    prof = cProfile.Profile()
    out = io.StringIO()
    prof.enable()
    code = skel.main(VERBS, env=env, stdin=io.BytesIO(data), stdout=out)
    prof.disable()
    skel.main(VERBS, env={**env, "CNI_COMMAND": "DEL"}, stdin=io.BytesIO(data), stdout=io.StringIO())
    stats = pstats.Stats(prof)
    phases: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for phase, (suffix, fn) in PHASES.items():
        ms = sum(
            v[3] * 1000 for (file, _line, name), v in raw.items() if file.endswith(suffix) and name == fn
        )
        phases[phase] = ms
    top = io.StringIO()
    pstats.Stats(prof, stream=top).sort_stats("cumulative").print_stats(18)
    print(
        json.dumps(
            {
                "code": code,
                "output": out.getvalue()[:300],
                "import_skel_ms": (t1 - t0) * 1000,
                "import_add_path_ms": (t2 - t1) * 1000,
                "phases_ms": phases,
                "profile": top.getvalue()[-6000:],
            }
        )
    )


if __name__ == "__main__":
    main()
