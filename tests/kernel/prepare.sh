#!/usr/bin/env bash
# Prepare the kernel lane's VM: a Debian kernel with IPVS and cgroup v2, unpacked
# once into .cache/kernel/ of the project, its modules installed under /lib/modules
# (the guest shares the host's root, so modprobe in the guest finds them there).
# Idempotent and fast once done: a second run only checks files.
#
# Override the kernel package with KUBENODE_KERNEL_PACKAGE=linux-image-6.1.0-NN-amd64.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache=.cache/kernel
mkdir -p "$cache"
# Several worktrees of this project may share /lib/modules: one preparer at a time.
exec 9>/tmp/kubenode-kernel-prepare.lock
flock 9

need() { command -v "$1" >/dev/null 2>&1 || { echo "kernel lane: '$1' is missing ($2)" >&2; exit 1; }; }
need qemu-system-x86_64 "apt-get install qemu-system-x86"
need ipvsadm "apt-get install ipvsadm"
need depmod "apt-get install kmod"
need dpkg-deb "dpkg"
need flock "apt-get install util-linux"

# Already unpacked? Keep that kernel (a later apt index must not force a re-download).
version=""
if [ -s "$cache/version" ]; then
    version=$(cat "$cache/version")
    [ -f "$cache/root/boot/vmlinuz-$version" ] || version=""
fi

if [ -z "$version" ]; then
    pkg=${KUBENODE_KERNEL_PACKAGE:-}
    if [ -z "$pkg" ]; then
        # The kernel Debian currently ships for amd64 (what linux-image-amd64 depends on).
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
              | sed -n 's/^ *Depends: \(linux-image-6\.[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1)
        if [ -z "$pkg" ]; then
            apt-get update -qq
            pkg=$(apt-cache depends linux-image-amd64 \
                  | sed -n 's/^ *Depends: \(linux-image-6\.[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1)
        fi
    fi
    [ -n "$pkg" ] || { echo "kernel lane: no linux-image-6.*-amd64 package found in apt" >&2; exit 1; }
    version=${pkg#linux-image-}
    echo "kernel lane: fetching $pkg into $cache"
    rm -rf "$cache/download" "$cache/root"
    # apt drops to user _apt for downloads; let it write there.
    mkdir -p -m 0777 "$cache/download"
    (cd "$cache/download" && apt-get download -q "$pkg" >/dev/null)
    deb=$(ls "$cache"/download/*.deb | head -n1)
    dpkg-deb -x "$deb" "$cache/root"
    rm -rf "$cache/download"
    [ -f "$cache/root/boot/vmlinuz-$version" ] || { echo "kernel lane: $deb has no boot/vmlinuz-$version" >&2; exit 1; }
    echo "$version" > "$cache/version"
fi

# Modules where the guest's modprobe looks (the guest sees the host's /lib read-only).
if [ ! -f "/lib/modules/$version/modules.dep" ] \
   || [ ! -f "/lib/modules/$version/kernel/net/netfilter/ipvs/ip_vs.ko" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "kernel lane: need root to install modules into /lib/modules/$version" >&2
        exit 1
    fi
    mkdir -p /lib/modules
    rm -rf "/lib/modules/$version"
    cp -a "$cache/root/lib/modules/$version" "/lib/modules/$version"
    depmod "$version"
fi
echo "kernel lane: kernel $version ready ($cache/root/boot/vmlinuz-$version)"
