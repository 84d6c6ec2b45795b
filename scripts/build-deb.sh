#!/usr/bin/env bash
# Builds the Debian package of shyped from this tree (debian/, dh-virtualenv):
#
#     bash scripts/build-deb.sh [OUTDIR]      # -> OUTDIR/shyped_<version>_<arch>.deb (default dist/)
#
# Needs dpkg-dev, debhelper, dh-virtualenv and python3-venv (scripts/install-deps.sh installs
# them) and PyPI, from which pip fetches shyped's dependencies into the package's venv. The
# build runs in a temporary copy of the tree's files (tracked and new ones, as they are now;
# nothing git ignores, so no .venv), or of the whole directory of an unpacked sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
out=$(realpath -m "${1:-dist}")

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' shyped/__init__.py)
deb_version=$(dpkg-parsechangelog -l debian/changelog -S Version)
if [ "$version" != "$deb_version" ]; then
    echo "build-deb: shyped is $version but debian/changelog says $deb_version: add a" \
        "changelog entry (dch -v $version)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/shyped-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/shyped"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$src" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf - | tar -xf - -C "$work/shyped"
else
    tar --exclude=./.venv --exclude=./dist --exclude=./build -cf - . | tar -xf - -C "$work/shyped"
fi

(cd "$work/shyped" && dpkg-buildpackage --build=binary --no-sign) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (the end of its log is above)" >&2
    exit 1
}
mkdir -p "$out"
for deb in "$work"/shyped_*.deb; do
    cp "$deb" "$out/"
    echo "$out/$(basename "$deb")"
done
