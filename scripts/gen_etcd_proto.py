"""Generate the Python gRPC stubs of etcd's v3 API from the vendored proto/etcd/*.proto.

Why a script and not a plain protoc call: etcd's files import each other by Go paths
("etcd/mvcc/mvccpb/kv.proto") and import gogoproto and google/api annotations. Python module
names follow import paths, so the imports are re-rooted under core/_proto/etcd/ (the generated
modules become core._proto.etcd.*), and the gogoproto / google.api.http options are dropped: they
only steer Go code generation and the HTTP gateway and change nothing on the wire. The vendored
files stay byte for byte etcd's (see proto/etcd/README.md).

Usage: python scripts/gen_etcd_proto.py   (from the repository root; make proto runs it)
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto" / "etcd"
BUILD = ROOT / "build" / "etcd-proto"
PKG = "core/_proto/etcd"
FILES = ("kv.proto", "auth.proto", "rpc.proto")

IMPORTS = {
    '"etcd/mvcc/mvccpb/kv.proto"': f'"{PKG}/kv.proto"',
    '"etcd/auth/authpb/auth.proto"': f'"{PKG}/auth.proto"',
}


def _drop_http_options(text: str) -> str:
    """Remove every `option (google.api.http) = { ... };` (nested braces: additional_bindings)."""
    marker = "option (google.api.http) = {"
    while (start := text.find(marker)) >= 0:
        depth, i = 0, start + len(marker) - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        end = text.index(";", i) + 1
        text = text[:start] + text[end:]
    return text


def transform(text: str) -> str:
    text = re.sub(r'^import "gogoproto/gogo.proto";\n', "", text, flags=re.M)
    text = re.sub(r'^import "google/api/annotations.proto";\n', "", text, flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[a-z_]+\) = (true|false);\n", "", text, flags=re.M)
    text = _drop_http_options(text)
    for old, new in IMPORTS.items():
        text = text.replace(f"import {old};", f"import {new};")
    for leftover in ("gogoproto", "google.api", "import \"etcd/"):
        if leftover in text:
            raise SystemExit(f"gen_etcd_proto: {leftover!r} left after the transform: update the script")
    return text


def main() -> int:
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    out_dir = BUILD / PKG
    shutil.rmtree(BUILD, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in FILES:
        (out_dir / name).write_text(transform((SRC / name).read_text()))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{BUILD}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *[f"{PKG}/{n}" for n in FILES]]
    rc = protoc.main(args)
    if rc != 0:
        print(f"gen_etcd_proto: protoc failed ({rc})", file=sys.stderr)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
