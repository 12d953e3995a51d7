#!/bin/sh
# Put promtool (Prometheus's rule and metrics checker) into the folder $1, taken out of Debian's
# `prometheus` package: only the one binary, so no Prometheus server, service, system user or
# web-UI dependencies land on the machine and nothing is started. Used by `make test` for
# tests/observe/test_prometheus_rules.py; those tests skip, saying why, where this fails.
set -eu
dest=$1
if command -v promtool >/dev/null 2>&1; then
    echo "promtool: using $(command -v promtool)"
    exit 0
fi
if [ -x "$dest/promtool" ]; then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "promtool: no apt-get here" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download needs the package lists; refresh them once if they are missing (needs root).
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    [ "$(id -u)" = 0 ] || { echo "promtool: apt-get download failed and not root" >&2; exit 1; }
    apt-get update >/dev/null
    (cd "$work" && apt-get download prometheus >/dev/null)
fi
dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
mkdir -p "$dest"
mv "$work/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version | head -n 1
