#!/bin/bash
# Every patch SUSE has released, non-interactively.
set -euo pipefail
zypper --non-interactive refresh
zypper --non-interactive patch --with-update
