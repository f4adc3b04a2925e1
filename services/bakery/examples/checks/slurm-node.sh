#!/bin/bash
# Smoke check of a fresh node: the scheduler's daemons are installed and enabled, the image is labelled.
set -euo pipefail
command -v slurmd
systemctl is-enabled slurmd munge
# slurmd waits for the provisioning boot to end (see steps/slurm-node.sh)
grep -q /var/lib/hpcfleet/provisioned /etc/systemd/system/slurmd.service.d/hpcfleet-provisioned.conf
grep -q "${HPCFLEET_RECIPE}" /etc/hpcfleet-image
