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
cache=/var/cache/pyvol-plugin
key=$(printf '%s %s' "$packages" "$mirror" | sha256sum | cut -c1-12)
tarball="$cache/base-bookworm-$key.tar"

command -v debootstrap >/dev/null || { echo "make-base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    tree=$(mktemp -d /var/tmp/pyvol-base.XXXXXX)
    trap 'rm -rf "$tree"' EXIT
    timeout 900 debootstrap --variant=minbase --include="$packages" bookworm "$tree" "$mirror" >/dev/null
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
    tar -C "$tree" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
"$docker" import "$tarball" "$image" >/dev/null
echo "$image"
