# Sourced by the scripts that run inside the nested-KVM outer VM (tests/nested/outer.py):
# the system mounts, the environment, and /dev/kvm as a stock Debian 12 host has it
# (0660 root:kvm, the kvm group added to the overlaid /etc as Debian's udev package does).
# Defines RESULTS (the writable share) and finish() (records the status, powers off).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
export LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 COLUMNS=160 EMBER_CACHE=/var/lib/ember/cache
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=755 run /run; mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm; mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ln -sf /proc/self/fd /dev/fd
set -a; . /.nk-env; set +a
RESULTS=${RESULTS:?the outer VM was started without RESULTS}
getent group kvm >/dev/null || groupadd -r kvm
chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
echo "inside: $(uname -r), $(nproc) vCPUs, $(ls -l /dev/kvm)" | tee "$RESULTS/inside.log"
# Keep one (empty) KVM VM open for the whole run. KVM switches SVM on in every CPU when the
# first VM is created and off when the last one goes, by inter-processor calls; under the
# outer VM's multi-threaded TCG such a call now and then never completes (a soft lockup of
# minutes, seen here). Holding a VM makes that switch happen once, here, not at each test.
python3 -I -S -c 'import fcntl, os, time
fd = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(fd, 0xAE01, 0)
time.sleep(1 << 30)' &
finish() {
  echo "$1" > "$RESULTS/status"
  sync
  busybox poweroff -f
}
