"""The CLI boundary: our own bugs are not user errors (exit 1, a one-line 'internal error', traceback on --debug)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from muonft_cli import config as cfgmod
from muonft_cli.cli import app
from muonft_cli.errors import UserInputError


def _boom(*_a, **_k):
    raise RuntimeError("boom: an internal bug\nsecond line")


def test_internal_error_is_one_line_exit_1(monkeypatch):
    monkeypatch.setenv("MUONFT_DEBUG", "0")  # restored after the test, whatever --debug sets
    monkeypatch.setattr(cfgmod, "resolve", _boom)
    r = CliRunner().invoke(app, ["eval", "--model", "m", "--data", "d"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "internal error (RuntimeError: boom: an internal bug)" in lines[0]
    assert "--debug" in lines[0] and "Traceback" not in r.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, how):
    monkeypatch.setenv("MUONFT_DEBUG", "0")  # restored after the test, whatever --debug sets
    monkeypatch.setattr(cfgmod, "resolve", _boom)
    if how == "env":
        monkeypatch.setenv("MUONFT_DEBUG", "1")
        args = ["eval", "--model", "m", "--data", "d"]
    else:
        args = ["--debug", "eval", "--model", "m", "--data", "d"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    assert isinstance(r.exception, RuntimeError) and "boom" in str(r.exception)


def test_user_errors_stay_exit_2(monkeypatch):
    monkeypatch.setenv("MUONFT_DEBUG", "0")  # restored after the test, whatever --debug sets

    def bad(*_a, **_k):
        raise UserInputError("data 'd' does not exist: pass a file")

    monkeypatch.setattr(cfgmod, "resolve", bad)
    r = CliRunner().invoke(app, ["eval", "--model", "m", "--data", "d"])
    assert r.exit_code == 2 and r.output.strip() == "error: data 'd' does not exist: pass a file"
