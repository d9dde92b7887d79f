"""Entry script of the single executable (PyInstaller): `dist/quota-proxy`.

`serve --workers N` starts its workers with multiprocessing's spawn method, which in a
frozen program re-runs this executable; freeze_support() turns such a run into the worker
instead of a second CLI.
"""

import multiprocessing

from quota_proxy.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    main()
