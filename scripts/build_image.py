#!/usr/bin/env python3
"""Builds the ovs-underlay container image from the frozen bundle, offline (`make image`).

The image is FROM scratch, one layer:

    /opt/ovs-underlay/                    the bundle of `make binary` (dist/ovs-underlay/)
    /lib/x86_64-linux-gnu/..., /lib64/... exactly the shared libraries the bundle's ELF files need
                                          outside the bundle (ldd over every one, with
                                          LD_LIBRARY_PATH=_internal as the bootloader sets it),
                                          plus the dynamic loader
    /bin/busybox + applets                busybox-static: the shell install-cni needs, no more
    /usr/local/bin/ovs-underlay-entrypoint  packaging/image/entrypoint.sh (the roles)
    /usr/share/ovs-underlay/install-bundle.sh  the installer `make install` uses too
    /etc/passwd, /etc/group, /tmp, /run, /var/run -> ../run, /host (install-cni's mount point)

and is written as an OCI image layout in one tar, dist/ovs-underlay-<version>.oci.tar, named
localhost/ovs-underlay:<version> (the version of pyproject.toml). The name is what both loaders
show and what the manifests under conf-examples/kubernetes/ reference:
  - index.json carries `io.containerd.image.name` (what `ctr -n k8s.io images import` names the
    image by; without it ctr derives "import-<date>:..." or skips a full reference) and
    `org.opencontainers.image.ref.name` with the same full name (what `podman load` falls back
    to; a bare tag there would become "localhost/<tag>:latest");
  - a name without a registry gets "localhost/" from podman, and containerd's CRI plugin keeps
    "localhost/..." as it is, so kubelet with imagePullPolicy IfNotPresent finds the image it
    was given and never tries a registry.

Why the archive is written here and not by `buildah push oci-archive:`: buildah (1.28 in Debian
12) writes no containerd name annotation, so its archive would have to be unpacked and rewritten
anyway; writing the layout directly needs no container storage (nothing to mount, confine or
clean up), is byte-for-byte reproducible (sorted entries, owner root, one timestamp: the commit
time or SOURCE_DATE_EPOCH), and takes a few seconds. The result is checked by the tools that
consume it: tests/integration/test_e2e_image.py loads it with podman and runs every role.

Usage: scripts/build_image.py [--bundle DIR] [--output FILE] [--busybox PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "localhost/ovs-underlay"
BUNDLE_DIR = "opt/ovs-underlay"  # in the image, without the leading /
ENTRYPOINT = "/usr/local/bin/ovs-underlay-entrypoint"
INSTALLER = "/usr/share/ovs-underlay/install-bundle.sh"
IMAGE_PATH = "/opt/ovs-underlay:/usr/local/bin:/bin"
# The shell and the tools install-bundle.sh and the entrypoint use, plus a few to look around
# with `kubectl exec`. Nothing else of busybox is linked.
APPLETS = ("sh", "cat", "cp", "cut", "date", "echo", "env", "find", "grep", "head", "id", "ln", "ls",
           "mkdir", "mktemp", "mv", "ps", "readlink", "rm", "sed", "sha256sum", "sleep", "sort", "stat",
           "tail", "test", "[", "tr", "true", "false", "uname", "wc", "xargs", "chmod", "printf")

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


class BuildError(Exception):
    """Something the image cannot be built without; the message says what to do."""


def project_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def image_name(version: str) -> str:
    return f"{REPOSITORY}:{version}"


def archive_path(version: str) -> Path:
    return ROOT / "dist" / f"ovs-underlay-{version}.oci.tar"


# ---------------------------------------------------------------------------------------------
# The root filesystem


def is_elf(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"\x7fELF"


def elf_files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p))


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+)? ?\(0x[0-9a-f]+\)$")


def shared_libraries(elfs: Iterable[Path], bundle: Path) -> dict[str, Path]:
    """{path in the image: file on this machine} for every library the ELF files load from
    outside the bundle, the dynamic loader included; a library ldd cannot find is an error.

    ldd is asked as the loader will be: the programs at the top of the bundle are exec'd with
    no LD_LIBRARY_PATH (the PyInstaller bootloader itself needs the system's libz before it
    re-executes itself with LD_LIBRARY_PATH=_internal), everything under _internal/ is loaded
    with _internal/ first in LD_LIBRARY_PATH."""
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
    inside = str(bundle.resolve()) + "/"
    found: dict[str, Path] = {}
    for elf in elfs:
        top_level = elf.parent.resolve() == bundle.resolve()
        env = base_env if top_level else {**base_env, "LD_LIBRARY_PATH": str(bundle / "_internal")}
        res = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, env=env, timeout=60)
        out = res.stdout + res.stderr
        if res.returncode != 0:
            if "not a dynamic executable" in out or "statically linked" in out:
                continue
            raise BuildError(f"ldd {elf} failed: {out.strip()}")
        for line in out.splitlines():
            if "not found" in line:
                raise BuildError(f"{elf}: {line.strip()} (install the library on the build machine)")
            m = _LDD_LINE.match(line)
            if not m or not m.group(2) or not m.group(2).startswith("/"):
                continue  # linux-vdso.so.1 and friends: provided by the kernel
            path = m.group(2)
            if os.path.realpath(path).startswith(inside) or path.startswith(inside):
                continue
            found[path] = Path(os.path.realpath(path))
    return found


def check_static(binary: Path) -> None:
    res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if res.returncode == 0 and "statically linked" not in res.stdout:
        raise BuildError(f"{binary} is dynamically linked: install busybox-static")


def stage_rootfs(bundle: Path, busybox: Path, dest: Path) -> dict[str, Path]:
    """Fill `dest` (removed first) with the image's files; returns the libraries it copied."""
    for exe in ("ovs-underlay", "ovs-underlay-py", "ovs-underlay-ipam", "ovs-underlay-ipam-py",
                "ovs-underlay-ipamd", "ovs-underlay-node"):
        if not os.access(bundle / exe, os.X_OK):
            raise BuildError(f"{bundle / exe} missing: run `make binary` first")
    check_static(busybox)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("run", 0o755), ("var", 0o755),
                    ("var/lib", 0o755), ("var/log", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755),
                    ("host", 0o755), ("usr/local/bin", 0o755), ("usr/share/ovs-underlay", 0o755)):
        (dest / d).mkdir(parents=True, exist_ok=True)
        (dest / d).chmod(mode)
    (dest / "var/run").symlink_to("../run")  # as on the node: /var/run/netns is /run/netns
    (dest / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")

    shutil.copytree(bundle, dest / BUNDLE_DIR, symlinks=True)
    (dest / BUNDLE_DIR / "bin").mkdir(exist_ok=True)
    (dest / BUNDLE_DIR / "bin/ovs-underlay-ipamd").symlink_to("../ovs-underlay-ipamd")
    (dest / BUNDLE_DIR / "bin/ovs-underlay-node").symlink_to("../ovs-underlay-node")
    shutil.copy2(ROOT / "README.md", dest / BUNDLE_DIR / "README.md")

    libs = shared_libraries(elf_files(dest / BUNDLE_DIR), dest / BUNDLE_DIR)
    for in_image, source in sorted(libs.items()):
        target = dest / in_image.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)

    shutil.copy2(busybox, dest / "bin/busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    for src, in_image in ((ROOT / "packaging/image/entrypoint.sh", ENTRYPOINT),
                          (ROOT / "packaging/install-bundle.sh", INSTALLER)):
        target = dest / in_image.lstrip("/")
        shutil.copy2(src, target)
        target.chmod(0o755)
    return libs


# ---------------------------------------------------------------------------------------------
# The OCI image layout


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


class _Tee(io.RawIOBase):
    """A write-only stream that hashes and counts what goes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below `root`, parents first, names sorted: the same tree gives the same tar."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_layer(rootfs: Path, blob_dir: Path, mtime: int) -> tuple[Blob, str]:
    """The root filesystem as a gzip'd tar blob in `blob_dir`; returns it and its diff_id (the
    sha256 of the uncompressed tar, which the config must list)."""
    tmp = blob_dir / ".layer.tmp"
    with tmp.open("wb") as raw:
        compressed = _Tee(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
            plain = _Tee(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in _walk(rootfs):
                    info = tar.gettarinfo(str(path), arcname=path.relative_to(rootfs).as_posix())
                    if info.type not in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE):
                        raise BuildError(f"{path}: only files, directories and symlinks belong in the image")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = mtime
                    info.mode &= 0o7777
                    if info.isreg():
                        with path.open("rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
    digest = compressed.sha.hexdigest()
    tmp.rename(blob_dir / digest)
    return Blob(f"sha256:{digest}", compressed.size, MEDIA_LAYER), f"sha256:{plain.sha.hexdigest()}"


def _json_blob(blob_dir: Path, obj: Mapping[str, Any], media_type: str) -> Blob:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blob_dir / digest).write_bytes(data)
    return Blob(f"sha256:{digest}", len(data), media_type)


@dataclass(frozen=True)
class ImageSpec:
    name: str  # the full reference, e.g. localhost/ovs-underlay:0.1.0
    created: int  # seconds since the epoch: the image's and every file's time
    entrypoint: Sequence[str]
    cmd: Sequence[str]
    env: Mapping[str, str]
    labels: Mapping[str, str]
    architecture: str = "amd64"


@dataclass(frozen=True)
class Built:
    archive: Path
    manifest: Blob
    config: Blob
    layer: Blob


def write_oci_archive(rootfs: Path, spec: ImageSpec, out: Path, work: Path) -> Built:
    """`rootfs` as a one-layer OCI image layout in the tar `out` (replaced atomically)."""
    layout = work / "layout"
    if layout.exists():
        shutil.rmtree(layout)
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    layer, diff_id = write_layer(rootfs, blob_dir, spec.created)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(spec.created))
    config = _json_blob(blob_dir, {
        "created": created,
        "architecture": spec.architecture,
        "os": "linux",
        "config": {
            "Entrypoint": list(spec.entrypoint),
            "Cmd": list(spec.cmd),
            "Env": [f"{k}={v}" for k, v in spec.env.items()],
            "WorkingDir": "/",
            "Labels": dict(spec.labels),
            "StopSignal": "SIGTERM",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "scripts/build_image.py: the frozen bundle, "
                                                       "its shared libraries and busybox-static"}],
    }, MEDIA_CONFIG)
    manifest = _json_blob(blob_dir, {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }, MEDIA_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest.descriptor(
            platform={"architecture": spec.architecture, "os": "linux"},
            annotations={ANNOTATION_CONTAINERD_NAME: spec.name, ANNOTATION_REF_NAME: spec.name},
        )],
    }
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True, indent=2) + "\n")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in [layout / "oci-layout", layout / "index.json", layout / "blobs",
                         layout / "blobs" / "sha256", *sorted(blob_dir.iterdir())]:
                info = tar.gettarinfo(str(path), arcname=path.relative_to(layout).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = spec.created
                info.mode = 0o755 if info.isdir() else 0o644
                if info.isreg():
                    with path.open("rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
        tmp.rename(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    shutil.rmtree(layout)
    return Built(out, manifest, config, layer)


@dataclass(frozen=True)
class Inspected:
    """An OCI archive as a loader reads it, every digest and size checked."""

    names: list[str]  # tar member names, in order
    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    layer: list[tarfile.TarInfo]  # the root filesystem's entries


def inspect_archive(path: Path) -> Inspected:
    """Read `path` as `ctr images import` and `podman load` do (oci-layout, index.json, blobs by
    digest) and check what they check: every blob's sha256 and size, the layer's diff_id."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isreg() or m.isdir()):
                raise BuildError(f"{path}: {m.name} is not a regular file (containerd ignores those)")
        files = {m.name: m for m in members if m.isreg()}

        def read(name: str) -> bytes:
            fh = tar.extractfile(files[name])
            assert fh is not None
            return fh.read()

        def blob(desc: Mapping[str, Any]) -> bytes:
            algo, _, hexdigest = str(desc["digest"]).partition(":")
            data = read(f"blobs/{algo}/{hexdigest}")
            if algo != "sha256" or hashlib.sha256(data).hexdigest() != hexdigest or len(data) != desc["size"]:
                raise BuildError(f"{path}: blob {desc['digest']} does not match its descriptor")
            return data

        if json.loads(read("oci-layout")) != {"imageLayoutVersion": "1.0.0"}:
            raise BuildError(f"{path}: oci-layout is not version 1.0.0")
        index = json.loads(read("index.json"))
        (mdesc,) = index["manifests"]
        manifest = json.loads(blob(mdesc))
        config = json.loads(blob(manifest["config"]))
        (ldesc,) = manifest["layers"]
        plain = gzip.decompress(blob(ldesc))
    if config["rootfs"]["diff_ids"] != [f"sha256:{hashlib.sha256(plain).hexdigest()}"]:
        raise BuildError(f"{path}: the layer's diff_id is not the one its config lists")
    with tarfile.open(fileobj=io.BytesIO(plain)) as layer:
        entries = layer.getmembers()
    return Inspected([m.name for m in members], index, manifest, config, entries)


# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def created_time() -> int:
    """SOURCE_DATE_EPOCH, else the commit time: the same sources give the same image."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    commit_time = _git("log", "-1", "--format=%ct")
    return int(commit_time) if commit_time.isdigit() else int(time.time())


def tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: Sequence[str] | None = None) -> int:
    version = project_version()
    p = argparse.ArgumentParser(prog="build_image.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "dist" / "ovs-underlay")
    p.add_argument("--output", type=Path, default=archive_path(version))
    p.add_argument("--busybox", type=Path, default=Path(shutil.which("busybox") or "/bin/busybox"))
    p.add_argument("--work", type=Path, default=ROOT / "build" / "image")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    rootfs = args.work / "rootfs"
    try:
        libs = stage_rootfs(args.bundle, args.busybox, rootfs)
        spec = ImageSpec(
            name=image_name(version),
            created=created_time(),
            entrypoint=[ENTRYPOINT],
            cmd=["--help"],
            env={"PATH": IMAGE_PATH, "OVS_UNDERLAY_VERSION": version},
            labels={
                "org.opencontainers.image.title": "ovs-underlay",
                "org.opencontainers.image.description": "CNI plugin, IPAM daemon and warm-path server: "
                                                        "pods on physical networks through Open vSwitch",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0",
                **({"org.opencontainers.image.revision": rev} if (rev := _git("rev-parse", "HEAD")) else {}),
            },
        )
        built = write_oci_archive(rootfs, spec, args.output, args.work)
        inspect_archive(built.archive)  # read back as a loader would
    except (BuildError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"build-image: {exc}\n")
        return 1
    unpacked = tree_size(rootfs)
    shutil.rmtree(rootfs)
    shown = built.archive.relative_to(ROOT) if built.archive.is_relative_to(ROOT) else built.archive
    print(f"build-image: {spec.name} -> {shown}")
    print(f"build-image: {built.archive.stat().st_size / 1e6:.1f} MB archive, {unpacked / 1e6:.1f} MB "
          f"unpacked, {len(libs)} shared libraries from the build machine, {time.monotonic() - t0:.1f} s")
    print(f"build-image: manifest {built.manifest.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
