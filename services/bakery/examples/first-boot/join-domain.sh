#!/bin/bash
# First boot of a compute node: join ${domain} in ${ou}. The join password is read at boot from
# SSM Parameter Store (${password_parameter}); it is never baked into the image.
# This boot is the pool's provisioning boot (it stops the node when the boot is done), so slurmd
# does not run now: it starts on the next boot, once the node is powered on for work.
set -euo pipefail
password=$(aws ssm get-parameter --with-decryption --name '${password_parameter}' --query Parameter.Value --output text)
echo "$password" | realm join --user='${join_user}' --computer-ou='${ou}' '${domain}'
systemctl restart sssd
mkdir -p /var/lib/hpcfleet && touch /var/lib/hpcfleet/provisioned
