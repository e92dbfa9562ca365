#!/usr/bin/env bash
# Install what the tests need on a fresh Debian 12 (run as root), and nothing when it is
# already there: bubblewrap, redis-server, node/npm, chromium, esbuild (pinned in package.json,
# installed with `npm ci --ignore-scripts`), and pytest + redis-py (requirements-dev.txt).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

run_quiet() {
    # run a command, show its output only when it fails
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        say "command failed: $*"
        tail -n 40 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

# --- system packages ---------------------------------------------------------------
apt_pkgs=()
command -v bwrap >/dev/null 2>&1 || apt_pkgs+=(bubblewrap)
command -v redis-server >/dev/null 2>&1 || apt_pkgs+=(redis-server)
[ -x /usr/bin/node ] || apt_pkgs+=(nodejs)  # the sandbox runs /usr/bin/node
command -v npm >/dev/null 2>&1 || apt_pkgs+=(npm)
command -v python3 >/dev/null 2>&1 || apt_pkgs+=(python3)
python3 -m pip --version >/dev/null 2>&1 || apt_pkgs+=(python3-pip)
# the sandbox runs Debian's interpreter at /usr/bin/python3
[ -x /usr/bin/python3 ] || apt_pkgs+=(python3)
# tests/systemd: a systemd container (nspawn) and a cgroup-v2 VM (qemu), both debootstrap'd
command -v systemd-nspawn >/dev/null 2>&1 || apt_pkgs+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || apt_pkgs+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null 2>&1 || apt_pkgs+=(qemu-system-x86)
# tests/test_console.py: a real headless browser (driven by pip's playwright, pinned in
# requirements-dev.txt, through its executable path: `playwright install` is not used)
command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
# networked functions (tests/test_network.py): slirp4netns, nftables, iproute2 (ip netns, for
# the test lab), util-linux (unshare, nsenter)
command -v slirp4netns >/dev/null 2>&1 || apt_pkgs+=(slirp4netns)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || apt_pkgs+=(nftables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || apt_pkgs+=(iproute2)
command -v nsenter >/dev/null 2>&1 || apt_pkgs+=(util-linux)
command -v openssl >/dev/null 2>&1 || apt_pkgs+=(openssl)   # the lab's test CA (HTTPS test)

if [ ${#apt_pkgs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${apt_pkgs[*]} and no apt-get to install them"
    [ "$(id -u)" = 0 ] || die "missing ${apt_pkgs[*]}; run as root to install them"
    say "installing ${apt_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_quiet apt-get update -q || die "apt-get update failed"
    run_quiet apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}" \
        || die "apt-get install ${apt_pkgs[*]} failed"
fi

for c in bwrap redis-server node npm python3 chromium; do
    command -v "$c" >/dev/null 2>&1 || die "$c is still missing after installation"
done

# --- esbuild (npm, exact version from package.json) ---------------------------------
want_esbuild=$(node -e 'const p=require("./package.json");process.stdout.write((p.dependencies||{}).esbuild||(p.devDependencies||{}).esbuild||"")')
[ -n "$want_esbuild" ] || die "package.json does not pin esbuild"
esbuild_bin="$root/node_modules/@esbuild/linux-x64/bin/esbuild"
have_esbuild=$("$esbuild_bin" --version 2>/dev/null || true)
if [ "$have_esbuild" != "$want_esbuild" ]; then
    say "installing esbuild $want_esbuild (npm ci)"
    run_quiet npm ci --ignore-scripts --no-audit --no-fund || die "npm ci failed"
    have_esbuild=$("$esbuild_bin" --version 2>/dev/null || true)
    [ "$have_esbuild" = "$want_esbuild" ] \
        || die "esbuild $want_esbuild not found at $esbuild_bin after npm ci (got '$have_esbuild')"
fi

# --- Python test dependencies --------------------------------------------------------
if ! python3 - requirements-dev.txt <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    if want and version(name.strip()) != want.strip():
        sys.exit(1)
    if not want:
        version(name.strip())
PY
then
    say "installing Python packages from requirements-dev.txt"
    # Debian's own python3 refuses pip installs without this (PEP 668)
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        run_quiet python3 -m pip install -q -r requirements-dev.txt \
        || die "pip install -r requirements-dev.txt failed"
fi
