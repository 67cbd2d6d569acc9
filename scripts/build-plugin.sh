#!/usr/bin/env bash
# Build the managed plugin from the Dockerfile and create it in Docker:
#   sudo scripts/build-plugin.sh [--base IMAGE] [--name NAME] [--enable]
# 1. wheels for pyvol and its dependencies, for the image's Python (3.11), into build/wheels;
# 2. `docker build` of the Dockerfile FROM the base image (default: python:3.11-slim-bookworm;
#    scripts/make-base-image.sh makes a local one where no registry is reachable);
# 3. the image's filesystem + config.json become build/plugin, and `docker plugin create`.
# Upgrade an installed plugin: docker plugin disable -f pyvol; docker plugin rm -f pyvol;
# then run this again with --enable (volumes and data live on the host, in /var/lib/pyvol).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
base=python:3.11-slim-bookworm
name=pyvol
enable=0
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --enable) enable=1; shift ;;
        *) echo "build-plugin.sh: unknown argument $1; accepted: --base IMAGE, --name NAME, --enable" >&2; exit 2 ;;
    esac
done
docker=${DOCKER:-docker}
python=${PYTHON:-python3}

rm -rf build/wheels build/plugin
mkdir -p build/wheels build/plugin/rootfs
"$python" -m pip wheel -q --no-deps -w build/wheels .
"$python" -m pip download -q -d build/wheels --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux_2_36_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    $("$python" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))')

"$docker" build -q --build-arg BASE="$base" -t "$name-rootfs:build" . >/dev/null
cid=$("$docker" create "$name-rootfs:build")
"$docker" export "$cid" | tar -x -C build/plugin/rootfs
"$docker" rm "$cid" >/dev/null
cp config.json build/plugin/
"$docker" plugin create "$name" build/plugin >/dev/null
[ "$enable" = 1 ] && "$docker" plugin enable "$name" >/dev/null
echo "$name ($(du -sh build/plugin/rootfs | cut -f1) rootfs)"
