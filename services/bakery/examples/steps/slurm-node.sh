#!/bin/bash
# The scheduler's node software: slurmd and munge, started on boot; the controller is set at first boot.
set -euo pipefail
if command -v dnf >/dev/null; then dnf -y install slurm slurm-slurmd munge; else zypper --non-interactive install slurm munge; fi
systemctl enable munge slurmd
echo "slurm node software for ${HPCFLEET_RECIPE} ${HPCFLEET_VERSION}" > /etc/hpcfleet-image
