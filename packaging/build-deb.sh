#!/bin/sh
# Builds flock's Debian package, flock_VERSION_ARCH.deb, with dpkg-deb (no cargo-deb).
#
#   packaging/build-deb.sh [--bin-dir DIR] [--out DIR]
#
# --bin-dir DIR  package the flockd and flockctl in DIR instead of building them
#                (default: `cargo build --release --workspace --locked`, then target/release)
# --out DIR      where to write the .deb (default: target/debian)
#
# VERSION is the workspace's (Cargo.toml, [workspace.package]); ARCH is `dpkg
# --print-architecture`. Needs dpkg-dev (dpkg-shlibdeps, which computes Depends from the
# binaries, and binutils' strip). The man pages and completions come from the packaged flockd
# itself (`flockd gen-docs`), so they describe the binaries shipped. What goes where:
# packaging/deb/README.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=
out=

usage() {
    echo "usage: $0 [--bin-dir DIR] [--out DIR]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
    --bin-dir)
        [ $# -ge 2 ] || usage
        bin_dir=$2
        shift 2
        ;;
    --out)
        [ $# -ge 2 ] || usage
        out=$2
        shift 2
        ;;
    -h | --help)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "$0: unknown argument: $1" >&2
        usage
        ;;
    esac
done

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$0: $tool not found: apt-get install dpkg-dev (it brings dpkg-shlibdeps and binutils' strip)" >&2
        exit 1
    fi
done

target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in
/*) ;;
*) target=$root/$target ;;
esac
if [ -z "$bin_dir" ]; then
    (cd "$root" && cargo build --release --workspace --locked)
    bin_dir=$target/release
fi
out=${out:-$target/debian}
for b in flockd flockctl; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "$0: no executable $bin_dir/$b (give --bin-dir the directory with flockd and flockctl)" >&2
        exit 1
    fi
done

# The version of [workspace.package]: the first `version = "..."` after that header.
version=$(awk '
    /^\[/ { in_ws = ($0 == "[workspace.package]") }
    in_ws && /^version *= *"/ { sub(/^version *= *"/, ""); sub(/".*/, ""); print; exit }
' "$root/Cargo.toml")
if [ -z "$version" ]; then
    echo "$0: no version in [workspace.package] of $root/Cargo.toml" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps expects the package's files in debian/PACKAGE of a source tree with a
# debian/control: the staging tree is laid out so.
mkdir -p "$work/src/debian"
printf 'Source: flock\n\nPackage: flock\nArchitecture: any\n' >"$work/src/debian/control"
pkg=$work/src/debian/flock
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/default" \
    "$pkg/usr/share/man/man1" "$pkg/usr/share/doc/flock" \
    "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
    "$pkg/usr/share/fish/vendor_completions.d"

deb=$root/packaging/deb
for b in flockd flockctl; do
    install -m 0755 "$bin_dir/$b" "$pkg/usr/bin/$b"
    # Debug info stays in the build (target/.../flockd). The symbol table stays in the binary
    # (lintian's unstripped-binary-or-object): without it a panic's backtrace in the journal
    # names no function.
    strip --strip-debug "$pkg/usr/bin/$b"
done
install -m 0644 "$deb/flockd.service" "$pkg/lib/systemd/system/flockd.service"
install -m 0644 "$deb/default" "$pkg/etc/default/flock"
install -m 0644 "$deb/copyright" "$pkg/usr/share/doc/flock/copyright"
install -m 0644 "$deb/README" "$pkg/usr/share/doc/flock/README"
gzip -9n <"$root/README.md" >"$pkg/usr/share/doc/flock/README.md.gz"
maintainer="${DEBFULLNAME:-flock maintainers} <${DEBEMAIL:-maintainers@users.noreply.h-seed-e3756f8a.example}>"
# A native package's changelog: one entry, dated by the source's last commit when there is one
# (the same tree builds the same file).
when=$(git -C "$root" log -1 --format=%cD 2>/dev/null || date -R)
{
    printf 'flock (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Built from flock'"'"'s source tree; its history is the tree'"'"'s git log.\n\n'
    printf ' -- %s  %s\n' "$maintainer" "$when"
} | gzip -9n >"$pkg/usr/share/doc/flock/changelog.gz"
chmod 0644 "$pkg/usr/share/doc/flock/README.md.gz" "$pkg/usr/share/doc/flock/changelog.gz"

"$pkg/usr/bin/flockd" gen-docs --out "$work/docs"
for page in "$work/docs/man"/*.1; do
    name=$(basename "$page")
    gzip -9n <"$page" >"$pkg/usr/share/man/man1/$name.gz"
done
chmod 0644 "$pkg/usr/share/man/man1"/*
for b in flockd flockctl; do
    install -m 0644 "$work/docs/completions/$b" "$pkg/usr/share/bash-completion/completions/$b"
    install -m 0644 "$work/docs/completions/_$b" "$pkg/usr/share/zsh/vendor-completions/_$b"
    install -m 0644 "$work/docs/completions/$b.fish" "$pkg/usr/share/fish/vendor_completions.d/$b.fish"
done

for script in postinst prerm postrm; do
    install -m 0755 "$deb/$script" "$pkg/DEBIAN/$script"
done
echo /etc/default/flock >"$pkg/DEBIAN/conffiles"

# libc6 and libgcc-s1 for a Rust binary, with the versions its symbols need.
depends=$(cd "$work/src" && dpkg-shlibdeps -O "$pkg/usr/bin/flockd" "$pkg/usr/bin/flockctl" |
    sed -n 's/^shlibs:Depends=//p')
if [ -z "$depends" ]; then
    echo "$0: dpkg-shlibdeps found no dependencies for the binaries" >&2
    exit 1
fi
installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort |
    xargs md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums" "$pkg/DEBIAN/conffiles"

cat >"$pkg/DEBIAN/control" <<EOF
Package: flock
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Recommends: iptables, iproute2, docker.io | docker-ce
Suggests: zfsutils-linux | zfs-fuse
Section: admin
Priority: optional
Description: stateful apps on a cluster of machines, data moving with them
 flock runs stateful apps (processes or Docker containers, deployed from
 compose or Flocker's files) on a cluster of machines and moves their data
 with them: datasets on a dir or zfs backend, with snapshots pushed between
 nodes, follow an app that moves or fails over. Every machine runs the same
 daemon; the daemons replicate the cluster's desired state through Raft, so
 there is no separate control host.
 .
 This package has flockd, the daemon (with a systemd unit, flockd.service,
 configured in /etc/default/flock), and flockctl, the operator's CLI.
EOF

mkdir -p "$out"
file=$out/flock_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$pkg" "$file" >/dev/null
echo "$file"
