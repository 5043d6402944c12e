#!/bin/bash
# PID 1 of the VM lane's guest, stage 2 (after tests/vm/init.sh): runs on the host's own root
# (9p, read-only, under a tmpfs overlay), so the host's .venv and checkout run unchanged on
# Debian 12's 6.1 kernel with the unified cgroup v2 hierarchy only.
#
# Lays out cgroups as systemd does for a service (the lane's pytest runs in the leaf
# /system.slice/lane.service, its parent slice delegates cpu, memory and pids), gives the
# unprivileged user jc-rootless a delegated subtree (/user.slice/jc-rootless, chowned, as
# systemd's Delegate=yes does), runs the selected tests as root, writes junit xml, the log and
# the exit code to the results share, and powers off. The driver is tests/vm/lane.py.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8 HOME=/root PYTHONUNBUFFERED=1
say() { echo "vm-guest: $*" | tee -a /run/vm-results/guest.log >/dev/console 2>/dev/null; }

param() {  # value of jc.NAME= on the kernel command line
    local arg
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "jc.$1="*) echo "${arg#jc.$1=}"; return ;; esac
    done
}
REPO="$(param repo)"
CACHE="$(param cache)"
RESULTS=/run/vm-results

finish() {
    echo "$1" > "$RESULTS/rc"
    sync
    say "exit code $1, powering off"
    echo o > /proc/sysrq-trigger   # immediate power-off; nothing left to flush
    sleep 5
}

# --- filesystems -------------------------------------------------------------------------
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p "$RESULTS" /run/lock
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results "$RESULTS" || { say "no results share"; echo o > /proc/sysrq-trigger; }
exec >>"$RESULTS/guest.log" 2>&1
say "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts 2>/dev/null || { mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; }
mkdir -p /dev/shm && mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
# the scratch disk (ext4, made by the driver): the stores, /tmp and pytest's temp folders
mkdir -p /scratch && mount -t ext4 /dev/vda /scratch || { say "no scratch disk"; finish 3; }
mkdir -p /scratch/tmp /scratch/var-lib /scratch/var-cache
chmod 1777 /scratch/tmp
# a checkout under /tmp (CI's fresh clone) stays visible at its path over the scratch /tmp
case "$REPO/" in
    /tmp/*) mkdir -p /run/jc-repo && mount --bind "$REPO" /run/jc-repo || finish 3 ;;
esac
mount --bind /scratch/tmp /tmp
case "$REPO/" in
    /tmp/*) mkdir -p "$REPO" && mount --bind /run/jc-repo "$REPO" || finish 3 ;;
esac
mkdir -p /var/lib/jupyter-contain && mount --bind /scratch/var-lib /var/lib/jupyter-contain
# the host's folders that hold its own live state must not be seen as the guest's
for d in /var/tmp /root/.local/share/jupyter/runtime; do
    [ -d "$d" ] && mount -t tmpfs tmpfs "$d"
done
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup || { say "no cgroup2"; finish 3; }
mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

# Debian's 6.1 modules (the host has none for this kernel): the kernel asks modprobe for
# overlay, veth, bridge, nf_tables... when a test first needs them
mkdir -p /usr/lib/modules
ln -sfn "$CACHE/tree/lib/modules/$(uname -r)" "/usr/lib/modules/$(uname -r)"
[ -e /usr/sbin/modprobe ] || ln -s /bin/busybox /usr/sbin/modprobe
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
for m in overlay veth bridge br_netfilter nf_tables nft_nat nft_masq nft_chain_nat tun; do
    modprobe "$m" 2>/dev/null || say "module $m not loaded"
done

# --- network: loopback and a dummy NIC (tests make their own namespaces and bridges) ---------
ip link set lo up
# a NIC as every machine has one (tests count the host's interfaces), with no way out of the guest
modprobe dummy 2>/dev/null && ip link add eth0 type dummy && ip link set eth0 up
hostname vm-lane

# --- cgroups as systemd lays them out -----------------------------------------------------
CG=/sys/fs/cgroup
say "cgroup v2 controllers: $(cat $CG/cgroup.controllers)"
echo "+cpu +memory +pids +io" > $CG/cgroup.subtree_control
mkdir -p $CG/init.scope $CG/system.slice/lane.service $CG/user.slice
echo $$ > $CG/init.scope/cgroup.procs
echo "+cpu +memory +pids" > $CG/system.slice/cgroup.subtree_control
echo "+cpu +memory +pids" > $CG/user.slice/cgroup.subtree_control
# jc-rootless: a delegated subtree, as systemd gives user@.service (Delegate=yes)
RUSER="$(param user)"
if id "$RUSER" >/dev/null 2>&1; then
    D=$CG/user.slice/$RUSER
    mkdir -p "$D/session"
    chown "$RUSER:" "$D" "$D/cgroup.procs" "$D/cgroup.subtree_control" "$D/cgroup.threads" \
        "$D/session" "$D/session/cgroup.procs" "$D/session/cgroup.subtree_control" "$D/session/cgroup.threads"
    echo "+cpu +memory +pids" > "$D/cgroup.subtree_control"
    echo "$D/session" > /run/vm-delegated-cgroup
fi

# --- the tests ----------------------------------------------------------------------------
cd "$REPO" || finish 3
# the driver's --native: a freshly built extension tried in the guest only (the guest's root is
# an overlay: the host's checkout is unchanged)
[ -f "$RESULTS/_native.abi3.so" ] && cp "$RESULTS/_native.abi3.so" jupyter_contain/native/_native.abi3.so
# the driver's --select / --pytest-args (a developer's narrower run) win over the lane's list
SEL_FILE=tests/vm/selection.txt
[ -s "$RESULTS/selection.txt" ] && SEL_FILE="$RESULTS/selection.txt"
SELECTION="$(grep -v '^#' "$SEL_FILE" | tr '\n' ' ')"
EXTRA="$(cat "$RESULTS/pytest-args" 2>/dev/null)"
say "running: $SELECTION"
(
    echo $BASHPID > $CG/system.slice/lane.service/cgroup.procs
    exec timeout --signal=KILL "$(param timeout)" .venv/bin/python -m pytest -p no:cacheprovider --junitxml="$RESULTS/junit.xml" -q -rfEs --durations=15 \
        -m "not needs_tools" $EXTRA $SELECTION
) 2>&1 | tee "$RESULTS/pytest.log" >/dev/console
rc=${PIPESTATUS[0]}
# leftovers the leak checks could miss: any jupyter-contain cgroup or overlay mount
left="$(find $CG -name 'jupyter-contain*' -type d 2>/dev/null)"
if [ -n "$left" ]; then
    echo "vm-guest: cgroups left behind: $left" | tee -a "$RESULTS/pytest.log" >/dev/console
    [ "$rc" -eq 0 ] && rc=4
fi
# (the root and, for a checkout under /tmp, its two binds above are the lane's own)
left="$(awk -v repo="$REPO" '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i+1) == "overlay" && $5 != "/" && $5 != "/run/jc-repo" && $5 != repo) print $5; break } }' /proc/self/mountinfo)"
if [ -n "$left" ]; then
    echo "vm-guest: overlay mounts left behind: $left" | tee -a "$RESULTS/pytest.log" >/dev/console
    [ "$rc" -eq 0 ] && rc=4
fi
finish "$rc"
