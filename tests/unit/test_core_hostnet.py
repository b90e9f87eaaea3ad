"""core/hostnet.py (the node agent's host netlink, through pyroute2): the lean pyroute2 import.
The plugin's own netlink (core/netlink.py over core/rtnl.py) imports no pyroute2 at all
(tests/unit/test_core_netlink.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fresh(code: str) -> dict[str, object]:
    """Run `code` in a new interpreter (nothing imported yet); it prints one JSON document."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_import_loads_only_the_pyroute2_modules_it_uses_and_the_full_package_still_works() -> None:
    out = _fresh(
        "import json, sys\n"
        "import core.hostnet\n"
        "heavy = [m for m in ('pyroute2.ndb', 'pyroute2.ipdb', 'pyroute2.conntrack', 'pyroute2.nl80211',\n"
        "                     'pyroute2.ipset', 'pyroute2.plan9') if m in sys.modules]\n"
        "from pyroute2 import config  # a submodule: must not run the real __init__\n"
        "heavy_after_submodule = 'pyroute2.ndb' in sys.modules\n"
        "h = core.hostnet.HostNet()\n"
        "lo = h.link('lo').index\n"
        "h.close()\n"
        "from pyroute2 import IPRoute, NDB\n"
        "import pyroute2\n"
        "print(json.dumps({'heavy': heavy, 'heavy_after_submodule': heavy_after_submodule, 'lo': lo,\n"
        "                  'same': IPRoute is core.hostnet.IPRoute, 'ndb': NDB.__name__,\n"
        "                  'version': pyroute2.__version__, 'nope': hasattr(pyroute2, 'no_such_name'),\n"
        "                  'handler': [type(h).__name__ for h in __import__('logging').getLogger('pyroute2').handlers]}))\n"
    )
    assert out["heavy"] == [] and out["heavy_after_submodule"] is False
    assert out["lo"] == 1
    assert out["same"] is True and out["ndb"] == "NDB"
    assert isinstance(out["version"], str) and out["version"].startswith("0.9")
    assert out["nope"] is False
    assert out["handler"] == ["NullHandler"]  # the one side effect of pyroute2/__init__.py, kept


def test_import_after_a_regular_pyroute2_import_uses_the_real_package() -> None:
    out = _fresh(
        "import json, sys\n"
        "import pyroute2\n"
        "import core.hostnet\n"
        "print(json.dumps({'same': core.hostnet.IPRoute is pyroute2.IPRoute,\n"
        "                  'file': sys.modules['pyroute2'].__file__.endswith('__init__.py')}))\n"
    )
    assert out == {"same": True, "file": True}
