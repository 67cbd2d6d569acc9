"""pyvol: a Docker volume plugin daemon.

The request path reads top to bottom: ``api`` (HTTP, Docker protocol and the CLI's control
API) calls ``volumes`` (Docker's lifecycle, mount counts), ``snapshots`` or ``backup``, which
keep their records in ``state`` and drive a backend from ``pyvol.backends`` through the
volume's kind (``kinds``: block or directory). docs/architecture.md draws it.
"""

__version__ = "0.1.0"
