"""pyvol: a Docker volume plugin daemon.

The request path reads top to bottom: ``api`` (HTTP, Docker protocol and the CLI's control
API) calls ``manager`` (volume lifecycle, locks, mount refcounts), which keeps its records in
``state`` and drives a backend from ``pyvol.backends``; ``fs`` holds the filesystem work
(mkfs, mount, freeze, grow) shared by every block backend.
"""

__version__ = "0.1.0"
