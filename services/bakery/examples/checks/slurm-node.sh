#!/bin/bash
# Smoke check of a fresh node: the scheduler's daemons are installed and enabled, the image is labelled.
set -euo pipefail
command -v slurmd
systemctl is-enabled slurmd munge
grep -q "${HPCFLEET_RECIPE}" /etc/hpcfleet-image
