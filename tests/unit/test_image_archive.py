"""scripts/build_image.py: the OCI archive layout that `ctr images import` and `podman load` read.

Built here from a small root filesystem (no bundle, no root); the real image is loaded and run
by podman in tests/integration/test_e2e_image.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import build_image as bi  # noqa: E402

CREATED = 1_700_000_000


def rootfs(base: Path) -> Path:
    root = base / "rootfs"
    (root / "opt/app").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    exe = root / "opt/app/run"
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    (root / "opt/app/data").write_bytes(os.urandom(4096))
    (root / "run").mkdir()
    (root / "var").mkdir()
    (root / "var/run").symlink_to("../run")
    return root


def spec(name: str = "localhost/ovs-underlay:9.9.9") -> bi.ImageSpec:
    return bi.ImageSpec(name=name, created=CREATED, entrypoint=["/opt/app/run"], cmd=["--help"],
                        env={"PATH": "/opt/app:/bin"}, labels={"org.opencontainers.image.version": "9.9.9"})


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return bi.write_oci_archive(rootfs(tmp_path), spec(), tmp_path / "out" / "img.oci.tar", tmp_path / "work").archive


def test_index_names_the_image_for_containerd_and_podman(archive: Path) -> None:
    got = bi.inspect_archive(archive)
    assert got.index["schemaVersion"] == 2 and got.index["mediaType"] == bi.MEDIA_INDEX
    (m,) = got.index["manifests"]
    assert m["mediaType"] == bi.MEDIA_MANIFEST
    assert m["platform"] == {"architecture": "amd64", "os": "linux"}
    # ctr takes io.containerd.image.name verbatim; podman falls back to ref.name and prefixes a
    # name without a registry with localhost/, so a full name in both gives one answer.
    assert m["annotations"] == {"io.containerd.image.name": "localhost/ovs-underlay:9.9.9",
                                "org.opencontainers.image.ref.name": "localhost/ovs-underlay:9.9.9"}


def test_layout_is_an_oci_image_layout_of_regular_files(archive: Path) -> None:
    got = bi.inspect_archive(archive)
    blobs = [n for n in got.names if n.startswith("blobs/sha256/") and len(n) == len("blobs/sha256/") + 64]
    assert got.names[:2] == ["oci-layout", "index.json"] and len(blobs) == 3  # config, manifest, layer
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            assert member.isreg() or member.isdir(), member.name  # containerd skips anything else
            assert (member.uid, member.gid, member.mtime) == (0, 0, CREATED), member.name


def test_manifest_config_and_layer_agree(archive: Path, tmp_path: Path) -> None:
    got = bi.inspect_archive(archive)
    assert got.manifest["mediaType"] == bi.MEDIA_MANIFEST and got.manifest["schemaVersion"] == 2
    assert got.manifest["config"]["mediaType"] == bi.MEDIA_CONFIG
    assert [layer["mediaType"] for layer in got.manifest["layers"]] == [bi.MEDIA_LAYER]
    cfg = got.config
    assert (cfg["architecture"], cfg["os"], cfg["created"]) == ("amd64", "linux", "2023-11-14T22:13:20Z")
    assert cfg["config"]["Entrypoint"] == ["/opt/app/run"] and cfg["config"]["Cmd"] == ["--help"]
    assert cfg["config"]["Env"] == ["PATH=/opt/app:/bin"]
    assert cfg["config"]["StopSignal"] == "SIGTERM"
    entries = {e.name: e for e in got.layer}
    assert entries["opt/app/run"].mode == 0o755 and entries["tmp"].mode == 0o1777
    assert entries["var/run"].issym() and entries["var/run"].linkname == "../run"
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == CREATED and not e.uname for e in got.layer)
    names = [e.name for e in got.layer]
    assert names.index("opt") < names.index("opt/app") < names.index("opt/app/run")  # parents first


def test_inspect_catches_a_corrupt_blob(archive: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "x"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="tar")
    got = bi.inspect_archive(archive)
    layer = unpacked / "blobs/sha256" / got.manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[-20] ^= 0xFF
    layer.write_bytes(bytes(data))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name in got.names:
            tar.add(unpacked / name, arcname=name, recursive=False)
    with pytest.raises(bi.BuildError, match="does not match"):
        bi.inspect_archive(bad)


def test_diff_id_is_the_uncompressed_layer(archive: Path) -> None:
    got = bi.inspect_archive(archive)
    with tarfile.open(archive) as tar:
        digest = got.manifest["layers"][0]["digest"].split(":")[1]
        fh = tar.extractfile(f"blobs/sha256/{digest}")
        assert fh is not None
        plain = gzip.decompress(fh.read())
    assert got.config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(plain).hexdigest()}"]}
    with tarfile.open(fileobj=io.BytesIO(plain)) as layer:
        member = layer.extractfile("opt/app/run")
        assert member is not None and member.read() == b"#!/bin/sh\necho hi\n"


def test_same_rootfs_same_bytes(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    a = bi.write_oci_archive(root, spec(), tmp_path / "a.tar", tmp_path / "wa").archive
    os.utime(root / "opt/app/data", (1, 1))  # file times do not leak into the image
    b = bi.write_oci_archive(root, spec(), tmp_path / "b.tar", tmp_path / "wb").archive
    assert a.read_bytes() == b.read_bytes()
    c = bi.write_oci_archive(root, spec("localhost/ovs-underlay:9.9.10"), tmp_path / "c.tar", tmp_path / "wc")
    assert c.archive.read_bytes() != a.read_bytes()
    assert not list(tmp_path.glob(".*.tmp.*")) and not (tmp_path / "wa" / "layout").exists()


def test_only_files_directories_and_symlinks(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    os.mkfifo(root / "tmp" / "fifo")
    with pytest.raises(bi.BuildError, match="fifo"):
        bi.write_oci_archive(root, spec(), tmp_path / "x.tar", tmp_path / "w")
    assert not (tmp_path / "x.tar").exists()


def test_shared_libraries_of_a_program_include_libc_and_the_loader(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "_internal").mkdir(parents=True)
    shutil.copy2("/bin/true", bundle / "prog")
    libs = bi.shared_libraries(bi.elf_files(bundle), bundle)
    assert any(p.endswith("/libc.so.6") for p in libs), libs
    assert any("ld-linux" in p for p in libs), libs
    assert all(src.is_file() and not str(src).startswith(str(bundle)) for src in libs.values())


def test_a_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    with pytest.raises(bi.BuildError, match="busybox-static"):
        bi.check_static(Path("/bin/true"))


def test_version_name_and_archive_path_come_from_pyproject(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "ovs-underlay"\nversion = "1.2.3"\n')
    assert bi.project_version(pyproject) == "1.2.3"
    assert bi.image_name("1.2.3") == "localhost/ovs-underlay:1.2.3"
    assert bi.archive_path("1.2.3") == ROOT / "dist" / "ovs-underlay-1.2.3.oci.tar"
    assert bi.IMAGE_PATH.split(":")[0] == f"/{bi.BUNDLE_DIR}"  # kubectl exec finds ovs-underlay-ipamd
