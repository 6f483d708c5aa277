#!/bin/bash
# Build (once) the Debian 12 rootfs tarball the provisioning test boots with
# systemd-nspawn. Cached under $THOX_CACHE/rootfs, keyed by this script's hash.
#
# The container has no route to the outside, so the .debs the roles install are
# downloaded here (apt-get --download-only) and left in /var/cache/apt/archives
# together with the package lists: the roles' apt tasks then install them
# offline, for real (the packages are NOT preinstalled).
#
# usage: mkrootfs.sh            prints the tarball path (builds it if missing)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${THOX_CACHE:-/var/cache/thox-build}"
mkdir -p "$cache/rootfs" "$cache/logs"
# the Debian release: the pinned one (versions.env)
suite="$(sed -n 's/^DEBIAN_SUITE=//p' "$repo/versions.env")"
[ -n "$suite" ] || { echo "mkrootfs: no DEBIAN_SUITE in $repo/versions.env" >&2; exit 1; }
key="$( { cat "$0"; echo "$suite"; } | sha256sum | cut -c1-12)"
out="$cache/rootfs/debian12-thox-$key.tar"

# booting, ssh and ansible's own needs: installed
BOOT_PKGS="systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,iproute2,procps,iputils-ping,netcat-openbsd,ca-certificates"
# what the roles install (base, mdns, firewall, ssh, thox_api, image, updates): downloaded only
ROLE_PKGS="acl curl jq less locales tzdata systemd-timesyncd python3-venv libgomp1 avahi-daemon avahi-utils libnss-mdns nftables openssh-server cloud-guest-utils systemd-resolved rauc rauc-service age zstd e2fsprogs grub-common"

if [ ! -s "$out" ]; then
  tmp="$out.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  echo "mkrootfs: building $out (a few minutes; log $cache/logs/mkrootfs.log)" >&2
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --include="$BOOT_PKGS" \
    --skip=cleanup/apt \
    --customize-hook='chroot "$1" apt-get -y -q --download-only install '"$ROLE_PKGS" \
    --customize-hook='echo thox-test > "$1/etc/hostname"' \
    --customize-hook='rm -f "$1/etc/ssh/ssh_host_"*' \
    --customize-hook='chroot "$1" systemctl enable ssh.service' \
    --customize-hook='mkdir -p "$1/etc/systemd/system/ssh.service.d" && printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/hostkeys.conf"' \
    "$suite" "$tmp" "$(cd "$repo" && python3 -m image mirror "$suite")" > "$cache/logs/mkrootfs.log" 2>&1 \
    || { tail -30 "$cache/logs/mkrootfs.log" >&2; exit 1; }
  mv "$tmp" "$out"
  trap - EXIT
fi
echo "$out"
