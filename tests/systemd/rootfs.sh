#!/bin/bash
# rootfs.sh -- build (once) and print the path of the pristine Debian 12 root filesystem that
# both the systemd-nspawn container test (container.sh) and the qemu VM test (vm.sh) start from.
#
#   tests/systemd/rootfs.sh            -> prints e.g. /var/cache/faas-ci/rootfs-3f9c0a1b
#
# It is never modified after it is built: the container boots an overlay on top of it and the VM
# boots an ext4 image made from a copy.  Rebuilt when missing or when the package list changes.
# Needs root (debootstrap).  Cold: ~1 min (debootstrap from the host's Debian mirror).
# env: FAAS_CI_CACHE (default /var/cache/faas-ci), MIRROR (default: the host's apt source).
set -euo pipefail

CACHE=${FAAS_CI_CACHE:-/var/cache/faas-ci}
SUITE=bookworm
# systemd as PID 1, what faas needs at run time (bubblewrap, Debian's python3 and nodejs 18),
# curl for the checks, and udev + kmod for the VM's boot.
PKGS=systemd,systemd-sysv,dbus,udev,kmod,procps,bubblewrap,python3,nodejs,curl
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

log() { echo "rootfs.sh: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }

ID=$(echo "$SUITE $PKGS" | sha256sum | cut -c1-8)
ROOTFS=$CACHE/rootfs-$ID
mkdir -p "$CACHE"
exec 8>"$CACHE/.rootfs.lock"
flock 8
if [ ! -e "$ROOTFS.ok" ]; then
  if ! command -v debootstrap >/dev/null; then
    log "apt-get install debootstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
  fi
  t0=$(date +%s)
  log "debootstrap $SUITE ($PKGS) from $MIRROR -> $ROOTFS (about a minute)"
  rm -rf "$ROOTFS" "$ROOTFS.tmp"
  if ! debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$ROOTFS.tmp" "$MIRROR" \
       >"$CACHE/debootstrap-$ID.log" 2>&1; then
    log "debootstrap failed; last lines of $CACHE/debootstrap-$ID.log:"
    tail -n 20 "$CACHE/debootstrap-$ID.log" >&2
    exit 1
  fi
  rm -f "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
  mv "$ROOTFS.tmp" "$ROOTFS"
  # older rootfs-* builds (other package lists) are dead weight
  for old in "$CACHE"/rootfs-*; do
    case $old in "$ROOTFS"|"$ROOTFS".*) ;; *) rm -rf "$old" ;; esac
  done
  echo "$SUITE $PKGS" >"$ROOTFS.ok"
  log "rootfs ready in $(( $(date +%s) - t0 )) s"
fi
echo "$ROOTFS"
