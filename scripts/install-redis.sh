#!/bin/sh
# Install Debian's redis-server for the event-bus tests (make test; tests/events start their own
# server on a free loopback port), unless one is already on PATH. Needs apt-get and root; exits
# 1 with the reason otherwise. A system service the package may start is not used by the tests.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    echo "redis: using $(command -v redis-server)"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "redis: no apt-get here" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "redis: installing it needs root (apt-get install redis-server)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
redis-server --version
