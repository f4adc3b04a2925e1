#!/bin/bash
# Every security and bug-fix update the distribution has shipped (Patch Tuesday's week included).
set -euo pipefail
dnf -y upgrade --refresh
dnf -y install amazon-ssm-agent
systemctl enable amazon-ssm-agent
