#!/bin/bash
# container.sh -- boot Debian 12's systemd as PID 1 in a systemd-nspawn container on this host
# (PID 1 is not systemd, cgroups are v1 "hybrid"), install faas from this repository the way the
# README says, and run tests/systemd/checks.py inside as a transient service.
#
#   sudo tests/systemd/container.sh                  # the checks; exit status = theirs
#   sudo tests/systemd/container.sh --probe-hardening  # also try the hardening options left out
#   sudo CT_CMD='bash' tests/systemd/container.sh    # any command instead (e.g. for debugging)
#
# The container root is an overlay on the cached rootfs (tests/systemd/rootfs.sh), thrown away
# at the end; the repository is bind-mounted read-only at /mnt/src. Leaves no process, mount or
# cgroup behind. Cold: ~1 min for the rootfs; warm: boot < 1 s, checks ~30-60 s.
#
# Workarounds this host needs (no host systemd, v1 cgroups):
#  * no host D-Bus: nspawn runs with --register=no --keep-unit;
#  * nspawn mounts the v1 controller hierarchies read-only, so the container's systemd could not
#    apply any limit: ct-init remounts them read-write before it execs systemd;
#  * nspawn mounts /proc/sys read-only, but bwrap --disable-userns writes the per-namespace
#    /proc/sys/user/max_user_namespaces: ct-init re-binds /proc/sys/user read-write;
#  * /run is not a tmpfs here: nspawn's scratch dirs go to a private tmpfs (unshare -m), and so
#    does the overlay mount, so both vanish with the container;
#  * systemd-sysctl is masked so the container never writes the host's sysctls;
#  * the container gets its own subtree faas-ct-<pid> in every host hierarchy, removed at the end.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROBE=""
[ "${1:-}" = --probe-hardening ] && PROBE=--probe-hardening
CT_CMD=${CT_CMD:-/usr/bin/python3 /mnt/src/tests/systemd/checks.py --env container --src /mnt/src $PROBE}
CGNAME=faas-ct-$$
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "container.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }
T_START=$(now)
if ! command -v systemd-nspawn >/dev/null; then
  log "apt-get install systemd-container"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd-container >/dev/null
fi
ROOTFS=$("$HERE/rootfs.sh")
T_ROOTFS=$(since "$T_START")

RUN=$(mktemp -d /var/tmp/faas-ct.XXXXXX)
MOUNTS=$(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts)
NSPAWN=""
cleanup() {
  set +e
  if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
    kill -TERM "$NSPAWN"                        # nspawn passes SIGRTMIN+3 on: a clean halt
    for _ in $(seq 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$NSPAWN" 2>/dev/null && kill -KILL "$NSPAWN"
  fi
  wait 2>/dev/null
  for m in $MOUNTS; do                          # stragglers, then the subtree depth-first
    [ -d "$m/$CGNAME" ] || continue
    for p in $(find "$m/$CGNAME" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  sleep 0.2
  for m in $MOUNTS; do
    [ -d "$m/$CGNAME" ] && find "$m/$CGNAME" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$m/$CGNAME" ] && log "WARNING: could not remove $m/$CGNAME"
  done
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for m in $MOUNTS; do
  mkdir "$m/$CGNAME"
  if [ -f "$m/cpuset.cpus" ]; then              # v1 cpuset children start empty
    cat "$m/cpuset.cpus" >"$m/$CGNAME/cpuset.cpus"; cat "$m/cpuset.mems" >"$m/$CGNAME/cpuset.mems"
  fi
done

# What goes into the overlay's upper layer before the boot.
mkdir -p "$RUN/upper" "$RUN/work" "$RUN/root"
cat >"$RUN/setup.sh" <<'EOF'
#!/bin/sh
# runs in the private mount namespace: $1 = rootfs (lower), $2 = run dir
set -e
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/root"
R=$2/root
cat >"$R/usr/local/sbin/ct-init" <<'INIT'
#!/bin/sh
for m in $(awk '$3 == "cgroup" { print $2 }' /proc/self/mounts); do
  mount -o remount,bind,rw "$m" || echo "ct-init: cannot remount $m read-write" >&2
done
mount --bind /proc/sys/user /proc/sys/user && mount -o remount,bind,rw /proc/sys/user
exec /lib/systemd/systemd "$@"
INIT
chmod 0755 "$R/usr/local/sbin/ct-init"
echo faas-ct >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 faas-ct\n' >"$R/etc/hosts"
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
         e2scrub_reap.service systemd-pstore.service getty@.service console-getty.service \
         systemd-sysctl.service systemd-timesyncd.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
mkdir -p "$R/mnt/src"
shift 2
exec systemd-nspawn "$@"
EOF
chmod +x "$RUN/setup.sh"

log "booting the container (rootfs $ROOTFS)"
T_BOOT=$(now)
(
  for m in $MOUNTS; do echo "$BASHPID" >"$m/$CGNAME/cgroup.procs"; done
  mkdir -p /run/systemd
  exec unshare --mount --propagation private -- "$RUN/setup.sh" "$ROOTFS" "$RUN" \
    --quiet -D "$RUN/root" --register=no --keep-unit --private-network --console=passive \
    --resolv-conf=off --timezone=off --link-journal=no --kill-signal=SIGRTMIN+3 \
    --bind-ro="$REPO:/mnt/src" /usr/local/sbin/ct-init
) >"$RUN/nspawn.log" 2>&1 &
NSPAWN=$!

LEADER=""
for _ in $(seq 500); do
  for c in $(pgrep -P "$(pgrep -P "$NSPAWN" | head -1)" 2>/dev/null) $(pgrep -P "$NSPAWN" 2>/dev/null); do
    [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && LEADER=$c
  done
  [ -n "$LEADER" ] && break
  kill -0 "$NSPAWN" 2>/dev/null || break
  sleep 0.02
done
[ -n "$LEADER" ] || { log "the container's PID 1 did not appear"; cat "$RUN/nspawn.log" >&2; exit 1; }
CT=(nsenter -t "$LEADER" -a --)
STATE=""
for _ in $(seq 600); do
  STATE=$("${CT[@]}" systemctl is-system-running --wait 2>/dev/null || true)
  case "$STATE" in running|degraded) break ;; esac
  sleep 0.05
done
T_BOOTED=$(since "$T_BOOT")
log "container systemd: $STATE after ${T_BOOTED} s"
[ "$STATE" = running ] || "${CT[@]}" systemctl --failed --no-legend --no-pager >&2 || true

set +e
T_CHECKS=$(now)
# shellcheck disable=SC2086
"${CT[@]}" systemd-run --quiet --wait --pipe --collect --unit=faas-ct-checks \
  -p TimeoutStartSec=infinity -E PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $CT_CMD
RC=$?
set -e
T_CHECKED=$(since "$T_CHECKS")
"${CT[@]}" systemctl poweroff --no-block >/dev/null 2>&1 || true
for _ in $(seq 200); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.05; done
echo "FAAS-SYSTEMD-TIMING {\"where\": \"container\", \"rootfs_s\": $T_ROOTFS, \"boot_s\": $T_BOOTED," \
     "\"checks_s\": $T_CHECKED, \"total_s\": $(since "$T_START"), \"rc\": $RC}"
exit $RC
