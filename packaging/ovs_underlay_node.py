"""PyInstaller launcher for the provider-network node agent.

The real entry point, `agent.__main__.main`, calls `multiprocessing.freeze_support()` first and
exits with the command's code; this file only exists because PyInstaller wants a script.
"""

import sys

from agent.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
