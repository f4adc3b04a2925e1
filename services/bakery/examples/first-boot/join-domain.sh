#!/bin/bash
# First boot of a compute node: join ${domain} in ${ou}. The join password is read at boot from
# SSM Parameter Store (${password_parameter}); it is never baked into the image.
set -euo pipefail
password=$(aws ssm get-parameter --with-decryption --name '${password_parameter}' --query Parameter.Value --output text)
echo "$password" | realm join --user='${join_user}' --computer-ou='${ou}' '${domain}'
systemctl restart sssd slurmd
