#!/usr/bin/env bash
# Make a local Debian bookworm image with MariaDB from Debian's packages (no registry needed):
#   sudo scripts/make-mariadb-image.sh [IMAGE]      (default pyvol-mariadb:bookworm)
# tests/test_mariadb.py and bench/bench_mariadb.py run their databases in it. `docker run -v
# VOL:/var/lib/mysql IMAGE` makes a datadir on an empty volume and starts mariadbd in the
# foreground, its log on stderr (`docker logs`); `docker exec C mariadb` is the client.
# debootstrap (minbase) with mariadb-server, then `docker import`. The tarball is cached under
# /var/cache/pyvol-mariadb, keyed by this script's own text (packages, entrypoint and all)
# and the mirror, so only the first build downloads (a few minutes) and later ones take seconds.
set -euo pipefail
image=${1:-pyvol-mariadb:bookworm}
docker=${DOCKER:-docker}
packages="mariadb-server,mariadb-client"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=/var/cache/pyvol-mariadb
key=$({ cat "$0" "$(dirname "$0")/debian-tree.sh"; printf '%s' "$mirror"; } | sha256sum | cut -c1-12)
tarball="$cache/mariadb-bookworm-$key.tar"

# no service may start inside the tree while packages are configured
prepare() {
    mkdir -p "$1/usr/sbin"
    printf '#!/bin/sh\nexit 101\n' > "$1/usr/sbin/policy-rc.d"
    chmod 755 "$1/usr/sbin/policy-rc.d"
}

finish() {
    rm -f "$1/usr/sbin/policy-rc.d"
    # the datadir the packages made is the image's; a container's is made on its volume
    rm -rf "$1"/var/lib/mysql/*
    cat > "$1/usr/local/bin/pyvol-mariadb" <<'EOF'
#!/bin/sh
# A datadir on the volume at /var/lib/mysql (made on first start), then mariadbd in the
# foreground with its log on stderr. Commits are durable: one redo-log flush per commit.
set -e
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld /var/lib/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
        --auth-root-authentication-method=socket >/dev/null
fi
exec mariadbd --user=mysql --datadir=/var/lib/mysql --skip-name-resolve \
    --innodb-flush-log-at-trx-commit=1 "$@"
EOF
    chmod 755 "$1/usr/local/bin/pyvol-mariadb"
}

. "$(dirname "$0")/debian-tree.sh"
if [ ! -s "$tarball" ]; then
    debian_tarball "$tarball" "$packages" prepare finish
    find "$cache" -name 'mariadb-bookworm-*.tar' ! -path "$tarball" -delete
fi
"$docker" import --change 'CMD ["/usr/local/bin/pyvol-mariadb"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$image" >/dev/null
echo "$image"
