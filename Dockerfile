# The managed plugin's image: pyvol in a venv, and the system tools it runs.
#
#   scripts/build-plugin.sh        builds this, turns it into the plugin folder
#                                  (config.json + rootfs) and runs `docker plugin create pyvol`
#
# BASE is any Debian bookworm image with python3 and python3-venv. The default pulls
# python's slim image; CI, which reaches no registry, builds FROM a local image made with
# debootstrap (scripts/make-base-image.sh). Python packages come from wheels the build script
# prepares on the host (build/wheels), so the build itself needs no network.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TOOLS="e2fsprogs xfsprogs thin-provisioning-tools dmsetup nfs-common util-linux kmod"
RUN set -eu; \
    missing=""; \
    for p in $TOOLS python3-venv; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $missing && \
        rm -rf /var/lib/apt/lists/*; \
    fi

COPY build/wheels /tmp/wheels
RUN set -eu; \
    python3 -m venv /opt/pyvol; \
    /opt/pyvol/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir pyvol; \
    rm -rf /tmp/wheels; \
    find /opt/pyvol -name __pycache__ -prune -exec rm -rf {} +; \
    ln -s /opt/pyvol/bin/pyvol /usr/local/bin/pyvol

ENV PYVOL_ROOT=/var/lib/pyvol PYVOL_SOCKET=/run/docker/plugins/pyvol.sock \
    PYVOL_MOUNTS=/mnt/pyvol
ENTRYPOINT ["/opt/pyvol/bin/pyvol", "daemon"]
