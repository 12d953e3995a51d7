#!/bin/sh
# Install Debian's headless-capable Chromium for the HTML rendering tests (make test), unless a
# Chromium is already on PATH. Needs apt-get and root; exits 1 with the reason otherwise.
set -eu
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "chromium: using $(command -v "$name")"
        exit 0
    fi
done
command -v apt-get >/dev/null 2>&1 || { echo "chromium: no apt-get here" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "chromium: installing it needs root (apt-get install chromium)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version
