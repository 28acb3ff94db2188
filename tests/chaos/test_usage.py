"""`python -m chaos` refuses what it cannot replay faithfully, before it touches the machine."""

from __future__ import annotations

import pytest

from chaos.__main__ import EXIT_USAGE, main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "smoke,kill-leader", "--seed", "1"], "run takes one scenario"),
        (["matrix", "--scenarios", "smoke", "--seeds", "1,2,1"], "lists a seed more than once"),
        (["matrix", "--seeds", "1,x"], "integers separated by commas"),
        (["run", "no-such-scenario", "--seed", "1"], "unknown scenario(s) no-such-scenario"),
    ],
)
def test_usage_errors_say_what_to_do_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("chaos: error: ") and says in err and "Traceback" not in err
