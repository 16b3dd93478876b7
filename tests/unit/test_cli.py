"""`order-consumer`'s command line: a wrong option shows the usage of the command it was
given to, and each command's --help says what it does and where its settings are."""

from __future__ import annotations

import pytest

from intentflow.consumer.__main__ import main
from intentflow.consumer.tools import TOOLS


@pytest.mark.parametrize("command", ["run", "migrate", "relay", *TOOLS])
def test_a_wrong_option_shows_the_usage_of_its_own_command(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    given = {"dlq": ["list"], "prune": ["--older-than", "35d"], "backfill": ["--since", "1d"]}
    argv = [command, *given.get(command, [])]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--bogus"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(f"usage: order-consumer {command}"), err
    assert "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command", ["run", "migrate", "relay", *TOOLS])
def test_every_help_describes_its_command_and_names_where_its_settings_are(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    description = out.split("\n\n")[1]
    assert len(description) > 60, out
    assert "Consumer configuration (environment)" in " ".join(out.split()), out
