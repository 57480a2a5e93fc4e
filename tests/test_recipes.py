"""The shipped recipes through the real CLI: `muonft recipes` (list / show / copy) and the `recipe:NAME` form
accepted wherever a recipe path is (`--config`, `muonft sweep RECIPE`), from a directory that is not a clone."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from muonft_cli import config as C
from muonft_cli import recipes as R
from muonft_cli.cli import app
from muonft_cli.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in resources.files("muonft_cli.recipes").iterdir() if p.name.endswith(".yaml"))
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory: no `recipes/` folder beside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_clone_symlink_and_the_package_hold_the_same_recipes():
    assert len(SHIPPED) >= 10
    assert sorted(p.name for p in (REPO / "recipes").glob("*.yaml")) == [p.name for p in SHIPPED]


def test_list_names_every_shipped_recipe_with_its_leading_comment(elsewhere):
    r = invoke("recipes")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == sorted(p.name[:-5] for p in SHIPPED)
    by_name = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines}
    assert by_name["pretrain-tiny-adam"] == "Pretrain a tiny Llama (~2 M params) from scratch with AdamW on Shakespeare"
    # a dot inside brackets or an ellipsis ends nothing; the first top-level ': ' does
    assert by_name["llama2-7b-full"] == "The paper's §4 full fine-tuning setting on Llama-2-7B (App. E.2)"
    assert by_name["mismatch-small"] == ("The paper's controlled mismatch experiment (§3, Table 1, Fig. 4) scaled "
                                         "to a 2-core CPU")
    for p in SHIPPED:  # every description is words from the recipe's comment header
        head = " ".join(ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#"))
        assert by_name[p.name[:-5]] and head.startswith(by_name[p.name[:-5]])
    j = invoke("recipes", "--json")
    assert j.exit_code == 0 and [d["name"] for d in json.loads(j.stdout)] == list(by_name)


@pytest.mark.parametrize("spec", ["sweep-finetune", "sweep-finetune.yaml", "recipe:sweep-finetune"])
def test_show_prints_the_yaml_verbatim(elsewhere, spec):
    r = invoke("recipes", "show", spec)
    assert r.exit_code == 0, r.output
    assert r.stdout == (REPO / "recipes" / "sweep-finetune.yaml").read_text()


def test_unknown_name_is_one_line_with_a_suggestion_and_the_known_names(elsewhere):
    for args in (["recipes", "show", "sweep-finetun"], ["recipes", "copy", "sweep-finetun"],
                 ["sweep", "recipe:sweep-finetun", "--dry-run"],
                 ["pretrain", "--config", "recipe:sweep-finetun", "--out", "o"]):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "unknown recipe 'sweep-finetun'" in lines[0] and "did you mean 'sweep-finetune'" in lines[0]
        assert "pretrain-tiny-adam" in lines[0]  # the known names are listed
    assert not (elsewhere / "o").exists()


def test_copy_writes_the_recipe_and_refuses_to_overwrite(elsewhere):
    text = (REPO / "recipes" / "pretrain-tiny-adam.yaml").read_text()
    r = invoke("recipes", "copy", "pretrain-tiny-adam")
    assert r.exit_code == 0, r.output
    assert (elsewhere / "pretrain-tiny-adam.yaml").read_text() == text

    (elsewhere / "pretrain-tiny-adam.yaml").write_text("mine\n")
    r = invoke("recipes", "copy", "pretrain-tiny-adam.yaml")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--force" in r.stderr
    assert (elsewhere / "pretrain-tiny-adam.yaml").read_text() == "mine\n"
    r = invoke("recipes", "copy", "pretrain-tiny-adam", "--force")
    assert r.exit_code == 0 and (elsewhere / "pretrain-tiny-adam.yaml").read_text() == text

    (elsewhere / "sub").mkdir()
    assert invoke("recipes", "copy", "recipe:mismatch-small", "sub").exit_code == 0
    shipped = (REPO / "recipes" / "mismatch-small.yaml").read_text()
    assert (elsewhere / "sub" / "mismatch-small.yaml").read_text() == shipped
    assert invoke("recipes", "copy", "mismatch-small", "mine.yaml").exit_code == 0
    assert (elsewhere / "mine.yaml").is_file()
    r = invoke("recipes", "copy", "mismatch-small", "no/such/dir/x.yaml")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["pretrain-tiny-adam", "finetune-lora-muon.yaml"])
def test_config_accepts_recipe_name_anywhere(elsewhere, name):
    stem = name.removesuffix(".yaml")
    assert C.resolve(f"recipe:{name}") == C.resolve(REPO / "recipes" / f"{stem}.yaml")
    with pytest.raises(UserInputError, match="did you mean"):
        C.resolve("recipe:pretrain-tiny")


def test_sweep_accepts_recipe_name_from_any_directory(elsewhere):
    via_name = invoke("sweep", "recipe:mismatch-small", "--dry-run", "--json")
    via_path = invoke("sweep", REPO / "recipes" / "mismatch-small.yaml", "--dry-run", "--json")
    assert via_name.exit_code == 0, via_name.output
    assert via_name.stdout == via_path.stdout and len(via_name.stdout.splitlines()) > 10


def test_diagnose_sweep_command_runs_outside_a_clone(elsewhere):
    """The sweep line `muonft diagnose` prints names the shipped recipe (it used to say
    recipes/sweep-finetune.yaml, which exists only in a clone's root)."""
    from muonft_cli.diagnose.verdict import recommend

    rec = recommend("adam", "muon", 2_000_000, "runs/pre-adam/final", "builtin:kjv", source="test")
    args = shlex.split(rec["sweep_command"])
    assert args[2] == "recipe:sweep-finetune"
    (elsewhere / "runs" / "pre-adam" / "final").mkdir(parents=True)  # the model diagnosed (--dry-run checks it)
    r = invoke(*args[1:], "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    cells = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert cells and all("-lora-" in c["id"] and "-muon-" in c["id"] for c in cells)


def test_commands_in_the_recipes_comments_name_shipped_recipes():
    """`muonft recipes show` prints the header comment: its commands must work without a clone too."""
    pattern = re.compile(r"(?:--config|muonft sweep)\s+([^-\s]\S*)")
    found = 0
    for p in SHIPPED:
        for ref in pattern.findall(p.read_text()):
            found += 1
            assert ref.startswith("recipe:"), f"{p.name}: {ref}"
            assert R.name_of(ref)  # resolves
    assert found >= 8
