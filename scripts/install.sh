#!/usr/bin/env bash
# Install pyvol on a Debian/Ubuntu host and start its daemon on the default backend.
#   sudo scripts/install.sh
# Afterwards: docker run --volume-driver=pyvol -v data:/data busybox
# Settings: /etc/default/pyvol (PYVOL_ROOT, PYVOL_BACKEND, PYVOL_LOOP_POOL_SIZE, ...).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
pkgs=(python3 python3-venv python3-pip util-linux e2fsprogs xfsprogs)
# Docker itself only if the host has no engine yet (never replace a docker-ce install).
command -v dockerd >/dev/null || pkgs+=(docker.io)
apt-get install -y -qq "${pkgs[@]}" >/dev/null

python3 -m venv /opt/pyvol/venv
/opt/pyvol/venv/bin/pip install -q --upgrade pip
/opt/pyvol/venv/bin/pip install -q "$here"
ln -sf /opt/pyvol/venv/bin/pyvol /usr/local/bin/pyvol
install -m 0644 "$here/README.md" /opt/pyvol/README.md
[ -f /etc/default/pyvol ] || printf '# pyvol daemon settings, e.g.\n# PYVOL_LOOP_POOL_SIZE=500G\n' > /etc/default/pyvol

if [ -d /run/systemd/system ]; then
    install -m 0644 "$here/packaging/pyvol.service" /etc/systemd/system/pyvol.service
    systemctl daemon-reload
    systemctl enable --now pyvol.service
    systemctl is-active --quiet docker.service || systemctl start docker.service || true
else
    # No systemd (containers, minimal VMs): run it in the background, logging to a file.
    if ! pyvol info >/dev/null 2>&1; then
        set -a; . /etc/default/pyvol; set +a
        nohup /usr/local/bin/pyvol daemon >>/var/log/pyvol.log 2>&1 &
    fi
    pgrep -x dockerd >/dev/null || echo "install.sh: start dockerd yourself (no systemd here)"
fi

for _ in $(seq 1 100); do pyvol info >/dev/null 2>&1 && break; sleep 0.2; done
pyvol info
echo "pyvol is running: docker run --volume-driver=pyvol -v test_volume:/sample busybox"
