#!/bin/bash
# vm.sh -- boot Debian 12 in qemu (Debian's linux-image-amd64 kernel, systemd as PID 1, pure
# cgroup v2: what production hosts run and this host's kernel cannot offer), share this
# repository read-only into the guest, and run tests/systemd/checks.py --env vm there as a
# service: faas installed with `python3 faas.py install`, `systemctl enable --now faas`, curl.
#
#   sudo tests/systemd/vm.sh            # exit status = the checks' (124 VM hung, 125 VM failed)
#   sudo tests/systemd/vm.sh --prepare  # only build the cache
#   sudo VM_CMD='systemctl status' tests/systemd/vm.sh   # any command instead of the checks
#
# /dev/kvm on this host cannot run a stock kernel, so qemu emulates (TCG): the guest boots in
# ~20 s and starts interpreters ~20x slower than natively -- the checks look at behaviour,
# never at timings. A boot that hangs before the command starts is retried once.
# Cache ($FAAS_CI_CACHE/vm): kernel and busybox unpacked from their .debs (apt-get download),
# a tiny initrd, and an ext4 image made from the shared rootfs (tests/systemd/rootfs.sh). The
# image is never written: the guest disk is a throw-away qemu snapshot overlay.
# env: VM_TIMEOUT=420 (s, per attempt)  VM_SMP=2  VM_MEM=2048 (MiB)  VM_KEEP=1 (keep run dir)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${FAAS_CI_CACHE:-/var/cache/faas-ci}/vm
VM_TIMEOUT=${VM_TIMEOUT:-420}
VM_SMP=${VM_SMP:-2}
VM_MEM=${VM_MEM:-2048}
VM_CMD=${VM_CMD:-/usr/bin/python3 /mnt/host/tests/systemd/checks.py --env vm --src /mnt/host}
# initrd: disk, root fs and 9p share drivers (with their dependencies); more for the guest's systemd
MODULES="virtio_pci virtio_blk ext4 crc32c_generic 9pnet_virtio 9p"
ROOTFS_MODULES="autofs4 configfs fuse loop"
PY=/usr/bin/python3
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "vm.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 125; }

PREPARE=0
[ "${1:-}" = --prepare ] && PREPARE=1
[ "$(id -u)" = 0 ] || { log "needs root"; exit 2; }
T_START=$(now)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
ROOTFS=$("$HERE/rootfs.sh")
T_ROOTFS=$(since "$T_START")

# ---------------------------------------------------------------- kernel + busybox
if [ ! -s "$CACHE/kernel.ok" ]; then
  t=$(now); log "apt-get download linux-image-amd64 busybox-static"
  rm -rf "$CACHE/debs" "$CACHE/kpkg" "$CACHE/bb"; mkdir -p "$CACHE/debs"
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$kpkg" ]; then
    apt-get update -q >/dev/null
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$kpkg" ] || die "apt cannot resolve linux-image-amd64"
  (cd "$CACHE/debs" && apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1) || die "apt-get download failed"
  dpkg-deb -x "$CACHE"/debs/linux-image-[0-9]*.deb "$CACHE/kpkg"
  dpkg-deb -x "$CACHE"/debs/busybox-static_*.deb "$CACHE/bb"
  KV=$(ls "$CACHE/kpkg/lib/modules")
  # qemu boots the uncompressed ELF vmlinux through its PVH entry point: that saves the
  # bzImage's ~6 s of emulated XZ decompression at every boot.
  "$PY" - "$CACHE/kpkg/boot/vmlinuz-$KV" "$CACHE/vmlinux" <<'EOF'
import lzma, sys
blob = open(sys.argv[1], "rb").read()
start = blob.find(b"\xfd7zXZ\x00")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[start:]) if start >= 0 else b""
if elf[:4] != b"\x7fELF":
    sys.exit("no XZ-compressed ELF kernel inside " + sys.argv[1])
open(sys.argv[2], "wb").write(elf)
EOF
  rm -rf "$CACHE/debs"
  echo "$KV" >"$CACHE/kernel.ok"
  log "kernel $KV ready ($(since "$t") s)"
fi
KV=$(cat "$CACHE/kernel.ok")
MODDIR=$CACHE/kpkg/lib/modules/$KV

modules_with_deps() {  # .ko paths below MODDIR for the given modules, dependencies first
  "$PY" - "$MODDIR" "$@" <<'EOF'
import os, sys
moddir, wanted = sys.argv[1], sys.argv[2:]
where = {}
for root, _, files in os.walk(moddir):
    for name in files:
        if name.endswith(".ko"):
            where[name[:-3].replace("-", "_")] = os.path.relpath(os.path.join(root, name), moddir)
order, seen = [], set()
def add(name):
    name = name.replace("-", "_")
    if name in seen:
        return
    seen.add(name)
    if name not in where:
        sys.exit(f"module {name} not found")
    data = open(os.path.join(moddir, where[name]), "rb").read()
    at = data.find(b"\0depends=")
    if at >= 0:
        for dep in data[at + 9:data.index(b"\0", at + 1)].decode().split(","):
            if dep:
                add(dep)
    order.append(where[name])
for name in wanted:
    add(name)
print("\n".join(order))
EOF
}

# ---------------------------------------------------------------- initrd
INITRD=$CACHE/initrd-$(echo "$KV $MODULES" | sha256sum | cut -c1-8).img
if [ ! -s "$INITRD" ]; then
  ird=$(mktemp -d "$CACHE/initrd.XXXX")
  mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$CACHE/bb/bin/busybox" "$ird/bin/"
  for a in sh mount umount insmod sleep switch_root; do ln -s busybox "$ird/bin/$a"; done
  modules_with_deps $MODULES >"$ird/modules.list"
  while read -r m; do install -D -m 0644 "$MODDIR/$m" "$ird/lib/modules/$m"; done <"$ird/modules.list"
  cat >"$ird/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do insmod /lib/modules/$m || echo "initrd: insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exit 1; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
  chmod 0755 "$ird/init"
  (cd "$ird" && find . | "$CACHE/bb/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$INITRD.tmp")
  rm -f "$CACHE"/initrd-*.img; mv "$INITRD.tmp" "$INITRD"; rm -rf "$ird"
fi

# ---------------------------------------------------------------- guest image
# The image name carries a hash of this script and of the rootfs, so editing either rebuilds it.
IMG=$CACHE/disk-$(cat "$0" "$CACHE/kernel.ok" "$ROOTFS.ok" | sha256sum | cut -c1-12).img
if [ ! -s "$IMG" ]; then
  t=$(now); st=$(mktemp -d "$CACHE/stage.XXXX")
  cp -a "$ROOTFS/." "$st/"
  while read -r m; do install -D -m 0644 "$MODDIR/$m" "$st/lib/modules/$KV/$m"; done \
    < <(modules_with_deps $MODULES $ROOTFS_MODULES)
  cp "$MODDIR"/modules.{order,builtin,builtin.modinfo} "$st/lib/modules/$KV/" 2>/dev/null || true
  chroot "$st" /sbin/depmod -a "$KV"
  echo faas-vm >"$st/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 faas-vm\n' >"$st/etc/hosts"
  printf '/dev/vda / ext4 rw,noatime 0 0\n' >"$st/etc/fstab"
  mkdir -p "$st/mnt/vmrun" "$st/mnt/host"
  for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
           dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-timesyncd.service; do
    ln -sf /dev/null "$st/etc/systemd/system/$u"
  done
  cat >"$st/usr/local/sbin/vm-run" <<'EOF'
#!/bin/bash
# ExecStart of vm-run.service: mount the host's shares, wait for the end of the boot, run cmd.sh
# (output and exit status go back through the vmrun share), power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
o=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o $o vmrun /mnt/vmrun || { echo "vm-run: no vmrun share" >/dev/console; systemctl poweroff -ff; }
mount -t 9p -o $o,ro host /mnt/host
state=$(systemctl is-system-running --wait)
cut -d' ' -f1 /proc/uptime >/mnt/vmrun/uptime_at_start
echo "guest: system $state; $(systemd-analyze time | head -1)" >/mnt/vmrun/output.log
/bin/bash /mnt/vmrun/cmd.sh >>/mnt/vmrun/output.log 2>&1 </dev/null
echo $? >/mnt/vmrun/rc.tmp
cut -d' ' -f1 /proc/uptime >/mnt/vmrun/uptime_at_end
mv /mnt/vmrun/rc.tmp /mnt/vmrun/rc
sync; umount /mnt/host; umount /mnt/vmrun
systemctl poweroff -ff      # the disk is a throw-away overlay: no clean shutdown needed
EOF
  chmod 0755 "$st/usr/local/sbin/vm-run"
  cat >"$st/etc/systemd/system/vm-run.service" <<'EOF'
[Unit]
Description=run the host's command (tests/systemd/vm.sh), then power off
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/vm-run
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
  ln -sf ../vm-run.service "$st/etc/systemd/system/multi-user.target.wants/vm-run.service"
  rm -f "$IMG.tmp"
  mkfs.ext4 -q -F -L root -d "$st" "$IMG.tmp" 3G >/dev/null || die "mkfs.ext4 -d failed"
  rm -rf "$st"; rm -f "$CACHE"/disk-*.img; mv "$IMG.tmp" "$IMG"
  log "guest image built ($(since "$t") s)"
fi
flock -u 9; exec 9>&-
T_CACHE=$(since "$T_START")
[ "$PREPARE" = 1 ] && { log "cache ready in $CACHE (${T_CACHE} s)"; exit 0; }

# ---------------------------------------------------------------- one boot
ACCEL=(-accel tcg,thread=multi -cpu max)
if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
  ACCEL=(-accel kvm -cpu host)
fi
RUN="" QPID="" TPID=""
cleanup() {
  [ -n "$TPID" ] && kill "$TPID" 2>/dev/null
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill "$QPID"; sleep 1; kill -9 "$QPID" 2>/dev/null; fi
  [ -n "$QPID" ] && wait "$QPID" 2>/dev/null
  if [ -n "$RUN" ]; then
    if [ "${VM_KEEP:-0}" = 1 ]; then log "run dir kept: $RUN"; else rm -rf "$RUN"; fi
  fi
  QPID="" TPID=""
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

boot() {  # one VM run; sets RC (124 = hung, 125 = no result)
  RUN=$(mktemp -d /var/tmp/faas-vm.XXXXXX)
  printf 'exec %s\n' "$VM_CMD" >"$RUN/cmd.sh"
  : >"$RUN/output.log"
  local t_boot; t_boot=$(now)
  TMPDIR=$RUN qemu-system-x86_64 -nodefaults -no-user-config -machine pc "${ACCEL[@]}" \
    -smp "$VM_SMP" -m "$VM_MEM" -display none -no-reboot -serial "file:$RUN/console.log" \
    -kernel "$CACHE/vmlinux" -initrd "$INITRD" \
    -append "console=ttyS0 root=/dev/vda rw panic=-1 mitigations=off quiet loglevel=4" \
    -drive "file=$IMG,format=raw,if=virtio,snapshot=on,cache=unsafe" \
    -fsdev "local,id=vmrun,path=$RUN,security_model=none" -device virtio-9p-pci,fsdev=vmrun,mount_tag=vmrun \
    -fsdev "local,id=host,path=$REPO,security_model=none,readonly=on" -device virtio-9p-pci,fsdev=host,mount_tag=host \
    >"$RUN/qemu.log" 2>&1 &
  QPID=$!
  tail -s 0.5 -F -n +1 --pid="$QPID" "$RUN/output.log" 2>/dev/null &
  TPID=$!
  local hung=0
  while kill -0 "$QPID" 2>/dev/null; do
    if awk -v a="$t_boot" -v b="$(now)" -v t="$VM_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
      hung=1; log "no result after ${VM_TIMEOUT} s: killing qemu"
      kill "$QPID" 2>/dev/null; sleep 1; kill -9 "$QPID" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  wait "$QPID" 2>/dev/null || true; QPID=""
  sleep 0.6; kill "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; TPID=""
  if [ -s "$RUN/rc" ]; then
    RC=$(cat "$RUN/rc")
  elif [ "$hung" = 1 ]; then
    RC=124
  else
    RC=125
  fi
  if [ "$RC" -ge 124 ]; then
    log "VM run failed (rc $RC); last console lines:"
    tail -n 25 "$RUN/console.log" | sed 's/^/  console| /' >&2
    sed 's/^/  qemu| /' "$RUN/qemu.log" >&2
  fi
  GUEST_BOOT=$(cat "$RUN/uptime_at_start" 2>/dev/null || echo -1)
  STARTED=0; [ -s "$RUN/uptime_at_start" ] && STARTED=1
  QEMU_S=$(since "$t_boot")
  cleanup
}

ATTEMPTS=0
RC=125
while [ "$ATTEMPTS" -lt 2 ]; do
  ATTEMPTS=$((ATTEMPTS + 1))
  boot
  # retry once only when the guest never got to the command (an emulated boot that hung);
  # a command that started and then ran out of time would only run out of time again
  [ "$RC" -ge 124 ] && [ "$STARTED" = 0 ] || break
  [ "$ATTEMPTS" -lt 2 ] && log "the guest did not start the command: retrying once"
done
echo "FAAS-SYSTEMD-TIMING {\"where\": \"vm\", \"rootfs_s\": $T_ROOTFS, \"cache_s\": $T_CACHE," \
     "\"guest_boot_s\": $GUEST_BOOT, \"qemu_s\": $QEMU_S, \"attempts\": $ATTEMPTS," \
     "\"total_s\": $(since "$T_START"), \"rc\": $RC}"
exit "$RC"
