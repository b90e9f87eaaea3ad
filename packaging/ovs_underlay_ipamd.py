"""PyInstaller launcher for the node-local IPAM daemon and its CLI.

The real entry point, `ipamd.__main__.main`, calls `multiprocessing.freeze_support()` first and
returns the exit code; this file only exists because PyInstaller wants a script, not a module.
"""

import sys

from ipamd.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
