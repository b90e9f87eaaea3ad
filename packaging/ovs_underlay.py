"""PyInstaller launcher for the CNI plugin (exec'd by the container runtime).

The real entry point, `cni.__main__.main`, calls `multiprocessing.freeze_support()` first and
returns the exit code; this file only exists because PyInstaller wants a script, not a module.
"""

import sys

from cni.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
