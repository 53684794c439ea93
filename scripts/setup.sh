#!/usr/bin/env bash
# Set up what the exporter (and, with --test, every test lane) needs on a fresh
# Debian 12 machine: Debian packages, then a virtualenv in .venv with the project.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
# ipset and iproute2: `ipset list -t` is what tests and benchmarks compare with.
pkgs=(iproute2 ipset kmod)
if [ "$mode" = "--test" ]; then
    # Real parts the tests drive: IPVS tools and a VM for the kernel lane, Prometheus,
    # promtool, Alertmanager, and node_exporter as the peer the benchmarks compare with.
    pkgs+=(ipvsadm qemu-system-x86 prometheus prometheus-alertmanager prometheus-node-exporter
           busybox-static util-linux procps curl)
    # openssl: the API stand-in's TLS certificate (tests/apiserver.py).
    pkgs+=(openssl)
    # nftables: `nft -f` loads kube-proxy rulesets into test namespaces; the bench compares with `nft list table`.
    pkgs+=(nftables)
    # iptables (legacy and nft backends): kube-proxy's iptables rules restored into test namespaces;
    # the bench compares with `iptables-save`.
    pkgs+=(iptables)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to install Debian packages: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages that ship services must not try to start them in a container.
    policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
extras=""
[ "$mode" = "--test" ] && extras="[test,dashboards]"
stamp=".venv/.installed$extras"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
    touch "$stamp"
fi
if [ "$mode" = "--test" ]; then
    # The kernel lane's VM needs a kernel with IPVS; fetched once into .cache/.
    bash tests/kernel/prepare.sh
fi
