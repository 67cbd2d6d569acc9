# Sourced by make-base-image.sh and make-mariadb-image.sh: a Debian bookworm tree made once
# with debootstrap (minbase) and kept as a tarball, so that later builds take seconds.
#
#   debian_tarball TARBALL PACKAGES [PREPARE [FINISH]]
# makes TARBALL unless it exists; PREPARE and FINISH, if given, are functions called with the
# tree's path before debootstrap and after it (before the tarball is written).
# Needs: debootstrap, $mirror.

# A killed debootstrap leaves /proc and /sys (and, in some modes, /dev) mounted inside the
# tree: unmount them first, and never let rm cross into another filesystem, or removing the
# tree would walk into the host's.
debian_tree_remove() {
    local tree=$1 mp
    [ -d "$tree" ] || return 0
    awk -v t="$tree/" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r mp; do umount -l "$mp" || true; done
    rm -rf --one-file-system "$tree"
}

debian_tarball() {
    local tarball=$1 packages=$2 prepare=${3:-} finish=${4:-} tmp
    [ -s "$tarball" ] && return 0
    command -v debootstrap >/dev/null || {
        echo "$(basename "$0"): needs debootstrap (apt-get install debootstrap)" >&2; return 1; }
    mkdir -p "$(dirname "$tarball")"
    debian_tree=$(mktemp -d /var/tmp/pyvol-tree.XXXXXX)
    trap 'debian_tree_remove "$debian_tree"' EXIT
    [ -z "$prepare" ] || "$prepare" "$debian_tree"
    timeout 1200 debootstrap --variant=minbase --include="$packages" bookworm "$debian_tree" \
        "$mirror" >/dev/null
    rm -rf "$debian_tree"/var/cache/apt/archives/*.deb "$debian_tree"/var/lib/apt/lists/*
    [ -z "$finish" ] || "$finish" "$debian_tree"
    # two builds at once each write their own file; the rename makes one of them the cache
    tmp=$(mktemp "$tarball.XXXXXX")
    tar -C "$debian_tree" -cf "$tmp" .
    mv "$tmp" "$tarball"
    debian_tree_remove "$debian_tree"
    trap - EXIT
}
