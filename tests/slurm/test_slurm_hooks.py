"""`hook_main`, what Slurm's ResumeProgram / SuspendProgram run, against a stand-in autogrow."""

from __future__ import annotations

import pytest
from slurm_kit import HookServer
from tests_support import free_port

from services.autogrow.slurm_hooks import hook_main


@pytest.fixture
def hooks(hook_server: HookServer) -> HookServer:
    hook_server.calls.clear()
    hook_server.status = 200
    return hook_server


@pytest.mark.parametrize("action", ["resume", "suspend"])
def test_the_expanded_host_list_is_posted_to_autogrow(hooks: HookServer, action: str) -> None:
    assert hook_main(action, "node[001-003],gpu07", hooks.url + "/") == 0

    assert hooks.calls == [
        (f"/autogrow/hooks/{action}", ["node001", "node002", "node003", "gpu07"])
    ]


def test_a_refusal_is_a_failure_with_autogrows_answer(
    hooks: HookServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks.status = 503

    assert hook_main("resume", "node001", hooks.url) == 1

    assert capsys.readouterr().err == (
        f"hpcfleet slurm-resume: autogrow answered 503 to {hooks.url}/autogrow/hooks/resume: "
        '{"detail": "test answer"}\n'
    )


def test_an_unreachable_autogrow_is_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    assert hook_main("suspend", "node001", url) == 1

    assert capsys.readouterr().err.startswith(
        f"hpcfleet slurm-suspend: could not reach autogrow at {url}/autogrow/hooks/suspend: "
        "ConnectError"
    )


@pytest.mark.parametrize(
    ("action", "hosts", "message"),
    [
        ("resume", "node[001-", "hpcfleet slurm-resume: bad host list 'node[001-'"),
        ("resume", "", "hpcfleet slurm-resume: empty host list"),
        ("reboot", "node001", "hpcfleet slurm-reboot: unknown action 'reboot'"),
    ],
)
def test_bad_arguments_are_refused_before_calling_autogrow(
    hooks: HookServer, capsys: pytest.CaptureFixture[str], action: str, hosts: str, message: str
) -> None:
    assert hook_main(action, hosts, hooks.url) == 2

    assert capsys.readouterr().err.startswith(message)
    assert hooks.calls == []
