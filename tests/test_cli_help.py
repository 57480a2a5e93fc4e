"""`muonft COMMAND --help` as a reader sees it: every option described, each command's own defaults shown,
switches a recipe can turn on with a `--no-...` form, and the flags that choose where a run computes."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from muonft_cli.cli import app

runner = CliRunner()


def options(*command: str) -> dict[str, str]:
    """`{"--lr": "<float> Peak learning rate. [default: (1e-4)]", ...}` from the rendered --help (rich's boxed
    table, wide enough not to wrap the option names); an option's wrapped help lines are joined."""
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    out: dict[str, str] = {}
    current = None
    for line in r.stdout.splitlines():
        body = line.strip().strip("│").strip()
        if not body or body.startswith(("╭", "╰")):
            continue
        m = re.match(r"(--[\w-]+)\s*(.*)", body)
        if m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current is not None:
            out[current] += " " + body
    return {k: re.sub(r"\s+", " ", v).strip() for k, v in out.items()}


def default(text: str) -> str | None:
    m = re.search(r"\[default: \(?(.*?)\)?\]", text)
    return m.group(1) if m else None


@pytest.mark.parametrize("cmd,lr", [("pretrain", "1e-3"), ("finetune", "1e-4")])
def test_each_command_shows_its_own_defaults(cmd, lr):
    o = options(cmd)
    assert default(o["--lr"]) == lr
    assert "pretrain's default" not in o["--lr"]
    for name, value in {"--optim": "adamw", "--batch-size": "8", "--seq-len": "256", "--val-fraction": "0.05",
                        "--seed": "0", "--warmup-ratio": "0.03", "--clip": "1.0", "--eval-every": "50",
                        "--save-every": "auto", "--keep-last": "2", "--dtype": "fp32", "--device": "auto",
                        "--weight-decay": "0.0", "--threads": "torch's default"}.items():
        assert default(o[name]) == value, (name, o[name])


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_every_option_is_described(cmd):
    o = options(cmd)
    for name, text in o.items():
        described = re.sub(r"<[\w\[\]]+>|\[default:.*?\]", "", text).strip()
        assert len(described) > 10, (name, text)
    assert "0 = off" in o["--clip"]
    assert "matched choice for Adam-pretrained" in o["--optim"] and "muonft diagnose" in o["--optim"]
    assert "bf16" in o["--dtype"] and "CPU" in o["--dtype"]


def test_finetune_only_options_are_described():
    o = options("finetune")
    assert "Dropout" in o["--lora-dropout"] and default(o["--lora-dropout"]) == "0.0"
    assert default(o["--lora-variant"]) == "lora"


@pytest.mark.parametrize("cmd,switches", [
    ("pretrain", ["offline", "trust-remote-code", "gradient-checkpointing", "overwrite"]),
    ("finetune", ["offline", "trust-remote-code", "gradient-checkpointing", "overwrite", "merge"]),
    ("eval", ["offline", "trust-remote-code"]),
])
def test_switches_a_recipe_can_set_have_a_no_form_and_render_as_flags(cmd, switches):
    r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "250"})
    o = options(cmd)
    for s in switches:
        assert f"--no-{s}" in r.stdout, s
        assert "<bool>" not in o[f"--{s}"] and default(o[f"--{s}"]) == "off", o[f"--{s}"]
    assert [k for k, v in o.items() if "<bool>" in v] == ["--help"]  # typer's own


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_device_and_threads_flags(cmd):
    o = options(cmd)
    assert "cuda" in o["--device"] and "set_num_threads" in o["--threads"]


def test_no_flag_overrides_a_recipe(tmp_path, monkeypatch):
    """`--no-gradient-checkpointing` beats a recipe's `true`, and an unset switch leaves the recipe's value
    (seen in the config the CLI resolves; the command is stopped right there)."""
    from muonft_cli import config as cfgmod

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  gradient_checkpointing: true\nmodel:\n  offline: true\n")
    seen = {}
    real = cfgmod.resolve

    def resolve(*a, **kw):
        seen["cfg"] = real(*a, **kw)
        raise KeyboardInterrupt  # the CLI's exit 130: stop before any work

    monkeypatch.setattr(cfgmod, "resolve", resolve)
    r = runner.invoke(app, ["finetune", "--config", str(recipe), "--no-gradient-checkpointing", "--model", "m",
                            "--data", "d", "--out", str(tmp_path / "o")])
    assert r.exit_code == 130, r.output
    assert seen["cfg"].train.gradient_checkpointing is False and seen["cfg"].model.offline is True
