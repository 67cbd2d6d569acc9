#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (what CI runs).
#   sudo scripts/test.sh [pytest args...]
# The tests start their own dockerd (in a network namespace), pyvol daemons, and loop
# devices, and clean them up; they need root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (sudo): the tests make loop devices and mounts" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
need=(python3 python3-venv util-linux e2fsprogs xfsprogs docker.io busybox-static iproute2 procps
      dmsetup thin-provisioning-tools qemu-system-x86 linux-image-amd64 cpio kmod restic
      debootstrap docker-compose nfs-kernel-server nfs-common)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv="$here/.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e ".[test]"

# This kernel's tests, then the tests that need dm-thin: here if the kernel has it, else
# inside Debian's kernel under qemu (tests/vm/run_in_vm.py).
rc=0
"$venv/bin/python" -m pytest "$@" || rc=$?
# The kernel lane: dm-thin and the kernel NFS server, inside Debian's kernel under qemu (the
# dm tests ran above too when this kernel has dm-thin; running them again costs minutes only).
echo "test.sh: devicemapper and nfs tests, inside Debian's kernel under qemu"
"$venv/bin/python" tests/vm/run_in_vm.py -- \
    "$venv/bin/python" -m pytest -p no:cacheprovider --color=no -m "devicemapper or nfs" "$@" || rc=$?
exit $rc
