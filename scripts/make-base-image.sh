#!/usr/bin/env bash
# Make a local Debian bookworm base image for the plugin (no registry needed):
#   sudo scripts/make-base-image.sh [IMAGE]      (default pyvol-base:bookworm)
# debootstrap (minbase) with python3, python3-venv and the tools pyvol runs, then
# `docker import`. The tarball is cached under /var/cache/pyvol-plugin, keyed by the package
# list, so a second build takes seconds.
set -euo pipefail
image=${1:-pyvol-base:bookworm}
docker=${DOCKER:-docker}
packages="python3,python3-venv,e2fsprogs,xfsprogs,thin-provisioning-tools,dmsetup,nfs-common,util-linux,kmod"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
key=$(printf '%s %s' "$packages" "$mirror" | sha256sum | cut -c1-12)
tarball="/var/cache/pyvol-plugin/base-bookworm-$key.tar"

. "$(dirname "$0")/debian-tree.sh"
debian_tarball "$tarball" "$packages"
"$docker" import "$tarball" "$image" >/dev/null
echo "$image"
