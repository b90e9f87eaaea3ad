"""PyInstaller launcher for the CNI IPAM plugin (delegated to by other CNI plugins).

The real entry point, `cni.ipam_main.main`, calls `multiprocessing.freeze_support()` first and
returns the exit code; this file only exists because PyInstaller wants a script, not a module.
"""

import sys

from cni.ipam_main import main

if __name__ == "__main__":
    sys.exit(main())
