"""Entry point of `ovs-underlay-node` (console script and PyInstaller binary)."""

from __future__ import annotations

import multiprocessing
import sys


def main() -> None:
    # First, always: PyInstaller's multiprocessing hook relies on it in frozen binaries.
    multiprocessing.freeze_support()
    from agent.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
