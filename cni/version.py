"""The CNI spec versions this project speaks. stdlib only: skel and VERSION import it."""

from __future__ import annotations

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"


def version_tuple(version: str) -> tuple[int, int, int]:
    """"1.0.0" -> (1, 0, 0). Raises ValueError on anything else."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid version {version!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)
