#!/bin/busybox sh
# Kabuto guest /init: mount the basics, load the drivers, then hand PID 1 to the agent.
# Every command here costs a fork under TCG, so only what the agent cannot do itself is here.
# Kernel command-line words of the form name=value reach this script as variables:
#   agent_log_level=DEBUG   passed to the agent as --log-level
#   agent_vsock_port=1024   the AF_VSOCK port the agent serves (--vsock-port; 1024, Kata's, by default)
#   agent_vsock=auto        serve vsock when a virtio vsock device is bound (auto, the default), also
#                           without one, e.g. for the loopback transport at CID 1 (on), or never (off)
#   kabuto_vsock_probe=1    beside the agent, call it over vsock at CID 1 from inside the guest and
#                           print KABUTO-VSOCK-OK or KABUTO-VSOCK-FAILED (needs agent_vsock=on
#                           where the VM has no vsock device)
#   kabuto_probe=1          check the image (python, agent imports, modules), print a marker, power off
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root PYTHONPATH=/usr/lib/kabuto PYTHONDONTWRITEBYTECODE=1 PYTHONUTF8=1
@PYTHON_ENV@

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
if grep -q cgroup2 /proc/filesystems; then
    mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
fi
# Dependencies first (the list is ordered at build time); a driver whose device is absent
# still loads, so hot-plugged devices find their driver.
while read -r module; do
    insmod "$module" || echo "kabuto-init: cannot load $module" >/dev/console
done < /lib/modules/boot-modules
echo kabuto > /proc/sys/kernel/hostname

if [ -n "$kabuto_probe" ]; then
    echo "KABUTO-INIT-UP $(uname -r)"
    while read -r alias; do
        modprobe "$alias" || echo "kabuto-init: cannot load $alias"
    done < /lib/modules/demand-aliases
    python3 -S -c "@PROBE@" && echo KABUTO-PROBE-OK || echo KABUTO-PROBE-FAILED
    poweroff -f
fi
if [ -n "$kabuto_vsock_probe" ]; then
    python3 -S -m kabuto.guest.probe ${agent_vsock_port:+--port "$agent_vsock_port"} &
fi
exec python3 -S -m kabuto.guest ${agent_log_level:+--log-level "$agent_log_level"} \
    ${agent_vsock:+--vsock "$agent_vsock"} ${agent_vsock_port:+--vsock-port "$agent_vsock_port"}
