#!/usr/bin/env bash
# Installs Debian's `prometheus` package (prometheus and promtool) when either is missing.
# Idempotent and non-interactive; CI runs it as root before the tests. The package's own
# service is not started: the tests start their Prometheus on loopback themselves.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install.sh: prometheus/promtool missing and not root (no sudo)" >&2
        exit 1
    fi
    SUDO="sudo -n"
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps dpkg from starting the packaged service in this install.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if [ "$added_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

$SUDO apt-get update </dev/null
$SUDO apt-get install -y --no-install-recommends prometheus </dev/null

command -v promtool >/dev/null
command -v prometheus >/dev/null
prometheus --version 2>&1 | sed -n 1p
