"""What ``hpcfleet slurm-resume`` / ``hpcfleet slurm-suspend`` do when Slurm calls them.

In the mode where Slurm decides, its ResumeProgram and SuspendProgram get a compressed host list
(``node[001-004]``) and must return quickly. They hand the expanded list to autogrow's REST API,
which acts on it (power the pool nodes on or off); autogrow also keeps polling the queue, so a
call that fails only delays it. Slurm runs these programs as SlurmUser with no PATH and only
``SLURM_CONF`` in the environment, so everything they need comes in as arguments.
"""

from __future__ import annotations

import sys

import httpx
from hostlist import BadHostlist, expand_hostlist

ACTIONS = ("resume", "suspend")
TIMEOUT = 5.0
"""Seconds to wait for autogrow: Slurm's power-save thread waits for the hook to return."""


def hook_main(action: str, hostlist: str, autogrow_url: str) -> int:
    """POST the nodes of `hostlist` to ``{autogrow_url}/autogrow/hooks/{action}``.

    Returns the exit status: 0 when autogrow took the list, 1 when it could not be reached or
    refused it, 2 for bad arguments; failures are explained on stderr (Slurm logs it).
    """
    program = f"hpcfleet slurm-{action}"
    if action not in ACTIONS:
        return _fail(program, f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}", 2)
    try:
        nodes = expand_hostlist(hostlist)
    except BadHostlist as exc:
        return _fail(program, f"bad host list {hostlist!r}: {exc}", 2)
    if not nodes:
        return _fail(program, "empty host list", 2)
    url = f"{autogrow_url.rstrip('/')}/autogrow/hooks/{action}"
    try:
        response = httpx.post(url, json={"nodes": nodes}, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        return _fail(program, f"could not reach autogrow at {url}: {exc!r}", 1)
    if response.is_success:
        return 0
    body = response.text.strip().replace("\n", " ")[:300]
    return _fail(program, f"autogrow answered {response.status_code} to {url}: {body}", 1)


def _fail(program: str, message: str, status: int) -> int:
    print(f"{program}: {message}", file=sys.stderr)
    return status
