#!/bin/bash
# The scheduler's node software: slurmd and munge, started on boot; the controller is set at first boot.
set -euo pipefail
if command -v dnf >/dev/null; then dnf -y install slurm slurm-slurmd munge; else zypper --non-interactive install slurm munge; fi
systemctl enable munge slurmd
# Not on the instance's first boot: that is the pool's provisioning boot, which the pool ends by
# stopping the node, so a job Slurm placed on it then would be killed (found by the chaos run).
# The first-boot script marks the node provisioned; slurmd registers on every boot after that.
mkdir -p /etc/systemd/system/slurmd.service.d
cat > /etc/systemd/system/slurmd.service.d/hpcfleet-provisioned.conf <<'UNIT'
[Unit]
ConditionPathExists=/var/lib/hpcfleet/provisioned
UNIT
echo "slurm node software for ${HPCFLEET_RECIPE} ${HPCFLEET_VERSION}" > /etc/hpcfleet-image
