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
      debootstrap docker-compose nfs-kernel-server nfs-common systemd)
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
# Compile pyvol's modules once, here: with PYTHONDONTWRITEBYTECODE set (as on these machines)
# every daemon, CLI call and job would compile them again, a few seconds each under the qemu
# lane's emulated CPU, where the guest reads this tree read-only.
"$venv/bin/python" -m compileall -q plugin backends tests >/dev/null

# Two lanes at once: this kernel's tests, and the kernel lane (dm-thin and the kernel NFS
# server, inside Debian's kernel under qemu: tests/vm/run_in_vm.py). The qemu lane mostly
# waits on its emulated CPU and the host lane on docker and disks, so together they take
# about as long as the longer one. The kernel lane's output follows the host lane's.
vm_log=$(mktemp /tmp/pyvol-vm-lane.XXXXXX)
(
    echo "test.sh: devicemapper and nfs tests, inside Debian's kernel under qemu"
    "$venv/bin/python" tests/vm/run_in_vm.py --timeout 3600 -- \
        "$venv/bin/python" -m pytest -p no:cacheprovider --color=no -m "devicemapper or nfs" "$@"
) >"$vm_log" 2>&1 &
vm_pid=$!
# The whole suite splits this kernel's lane in two: the ebs tests (EC2 through moto and
# tests/ebsfake.py) mostly wait on schedule periods and EC2 states, about 9 minutes of
# waiting beside the rest of the lane rather than after it. A selection runs as one lane.
selected=0
for a in "$@"; do
    case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && selected=1 ;; esac
done
ebs_pid=
if [ "$selected" = 0 ]; then
    ebs_log=$(mktemp /tmp/pyvol-ebs-lane.XXXXXX)
    ( echo "test.sh: the ebs tests, beside the rest of this kernel's lane"
      "$venv/bin/python" -m pytest -p no:cacheprovider "$@" tests/test_ebs.py ) >"$ebs_log" 2>&1 &
    ebs_pid=$!
    set -- "$@" --ignore=tests/test_ebs.py
fi
rc=0
"$venv/bin/python" -m pytest "$@" || rc=$?
if [ -n "$ebs_pid" ]; then
    ebs_rc=0
    wait "$ebs_pid" || ebs_rc=$?
    cat "$ebs_log"
    rm -f "$ebs_log"
    [ "$ebs_rc" = 0 ] || rc=$ebs_rc
fi
vm_rc=0
wait "$vm_pid" || vm_rc=$?
cat "$vm_log"
rm -f "$vm_log"
# With a selection (`test.sh tests/test_crashpoints.py`), one lane may have nothing to run:
# pytest says so with exit 5, which is no failure as long as the other lane ran something.
if [ $# -gt 0 ] && [ "$rc" = 5 ] && [ "$vm_rc" = 0 ]; then rc=0; fi
if [ $# -gt 0 ] && [ "$vm_rc" = 5 ] && [ "$rc" = 0 ]; then vm_rc=0; fi
[ "$vm_rc" = 0 ] || rc=$vm_rc
exit $rc
