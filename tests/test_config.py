"""Config loading: every recipe validates; bad keys/values give one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from muonft_cli import config as C
from muonft_cli.errors import ConfigError, UserInputError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_run_recipe_loads_and_validates(path):
    data = yaml.safe_load(path.read_text())
    if "sweep" in data:  # sweep recipes extend the run schema with a `sweep:` section of their own
        from muonft_cli.sweep import load_plan

        assert load_plan(path).cells
        return
    cfg = C.resolve(path)
    # 1:1 mirror: the resolved config, dumped and reloaded, is the same config
    again = C.from_dict(C.to_dict(cfg))
    assert again == cfg
    for section, values in data.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, (int, float)) and got == pytest.approx(value))


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer:\n  lrr: 0.1\ntrain:\n  stpes: 10\nmodle: {}\n")
    with pytest.raises(ConfigError) as e:
        C.resolve(p)
    msg = str(e.value)
    assert "unknown key 'optimizer.lrr' (did you mean 'lr'?)" in msg
    assert "unknown key 'train.stpes' (did you mean 'steps'?)" in msg
    assert "unknown key 'modle' (did you mean 'model'?)" in msg
    assert len(e.value.problems) == 3


def test_all_range_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        C.resolve(flags={"optimizer.lr": -1.0, "lora.rank": 0, "schedule.warmup_ratio": 1.5,
                         "optimizer.name": "adam"})
    msg = str(e.value)
    assert "optimizer.lr: must be > 0, got -1.0" in msg
    assert "lora.rank: must be >= 1" in msg
    assert "schedule.warmup_ratio: must be in [0, 1], got 1.5" in msg
    assert "optimizer.name: 'adam' is not one of" in msg and "did you mean 'adamw'" in msg
    assert len(e.value.problems) == 4


def test_val_fraction_one_leaves_no_training_data():
    with pytest.raises(ConfigError, match=r"data.val_fraction: 1 leaves no training data"):
        C.resolve(flags={"data.val_fraction": 1.0})
    assert C.resolve(flags={"data.val_fraction": 0.5}).data.val_fraction == 0.5


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        C.resolve(overrides=["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"optimizer.nesterov: expected true/false"):
        C.resolve(overrides=["optimizer.nesterov=maybe"])


def test_override_precedence_recipe_then_flags_then_set(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer:\n  name: muon\n  lr: 0.01\ntrain:\n  steps: 5\n")
    cfg = C.resolve(p, flags={"optimizer.lr": 0.02, "train.seed": None},
                    overrides=["optimizer.lr=3e-4", "lora.targets=[q_proj, v_proj]", "train.clip=null"])
    assert cfg.optimizer.name == "muon"
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5 and cfg.train.seed == 0
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.clip is None


def test_set_requires_key_value():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        C.resolve(overrides=["optimizer.lr"])


def test_original_scaling_requires_aux_lr():
    with pytest.raises(ConfigError, match="optimizer.adamw_lr: required with optimizer.scaling=original"):
        C.resolve(overrides=["optimizer.name=muon", "optimizer.scaling=original"])
    cfg = C.resolve(overrides=["optimizer.name=muon", "optimizer.scaling=original", "optimizer.adamw_lr=3e-4"])
    assert cfg.optimizer.adamw_lr == pytest.approx(3e-4)


def test_micro_batch_not_larger_than_batch():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        C.resolve(overrides=["train.batch_size=4", "train.micro_batch_size=8"])


def test_save_and_load_round_trip_and_diff(tmp_path):
    cfg = C.resolve(overrides=["optimizer.name=muon", "lora.rank=8", "optimizer.betas=[0.9, 0.98]"])
    C.save_yaml(cfg, tmp_path / "config.yaml")
    back = C.load_saved(tmp_path / "config.yaml")
    assert back == cfg
    other = C.resolve(overrides=["optimizer.name=muon", "lora.rank=16", "optimizer.betas=[0.9, 0.98]"])
    assert C.diff(cfg, other) == ["lora.rank: 8 -> 16"]
    assert C.diff(cfg, other, ignore=("lora.rank",)) == []


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        C.resolve(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("optimizer: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        C.resolve(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(UserInputError, match="must hold a mapping"):
        C.resolve(p)


# --------------------------------------------------------------------------------- the sweep section


def test_sweep_section_loads_with_the_run_configs_strict_loader():
    sec, problems = C.load_sweep_section({
        "bases": {"a": {"path": "runs/a", "pretrian": {}}, "b": {"pretrain": {"model": {"preset": "tiny"}},
                                                          "pretrained_with": "adma"}},
        "lr": {"full": ["x", 1e-3], "lora": {"muon": 1e-3}},
        "seeds": [0, 0],
        "metric": "bset",
        "lora_ranks": [0],
        "per_optim": {"moun": {}},
    })
    assert "unknown key 'sweep.bases.a.pretrian' (did you mean 'pretrain'?)" in problems
    assert "sweep.lr.full[0]: expected a number, got 'x'" in problems  # the list spelling's problem, not the dict's
    assert "sweep.lr.lora.muon: expected a list, got 0.001" in problems  # the dict spelling's problem
    assert any(p.startswith("sweep.bases.b.pretrained_with: 'adma' is not one of") for p in problems)
    assert "sweep.seeds: has duplicate values [0, 0]" in problems
    assert any(p.startswith("sweep.metric: 'bset' is not one of final, best") for p in problems)
    assert "sweep.lora_ranks[0]: must be > 0, got 0" in problems
    assert any(p.startswith("sweep.per_optim.moun: not an optimizer") and "(did you mean 'muon'?)" in p
               for p in problems)
    assert isinstance(sec.bases["a"], C.SweepBaseSection) and sec.bases["a"].path == "runs/a"
    # defaults, and the three spellings of the LR grid load as typed
    sec, problems = C.load_sweep_section({"bases": {"m": {"path": "p"}}, "lr": [1e-4, "3e-4"]})
    assert problems == [] and sec.lr == [1e-4, 3e-4] and sec.methods == ["full", "lora"] and sec.seeds == [0]
    sec, problems = C.load_sweep_section({"bases": {"m": {"path": "p"}}, "lr": {"full": [1e-4], "lora": {
        "adamw": [1e-3], "muon": [2e-3]}}})
    assert problems == [] and sec.lr["lora"]["muon"] == [2e-3]
    _, problems = C.load_sweep_section({"bases": {"m": {"path": "p"}}, "lr": [1e-4], "sed": [1]})
    assert problems == ["unknown key 'sweep.sed' (did you mean 'seeds'?)"]


# ------------------------------------------------------------------------------- issue 11 (items 6, 10, 11)


@pytest.mark.parametrize("seq_len", [0, 1])
def test_seq_len_below_two_is_a_config_error(seq_len):
    with pytest.raises(ConfigError, match=r"data.seq_len: must be >= 2 .*N-1 next-token targets"):
        C.resolve(flags={"data.seq_len": seq_len})
    assert C.resolve(flags={"data.seq_len": 2}).data.seq_len == 2


def test_type_and_range_problems_and_missing_inputs_in_one_pass():
    with pytest.raises(ConfigError) as e:
        C.resolve(flags={"model.name_or_path": "m"}, overrides=["train.steps=ten", "optimizer.momentum=1.5"],
                  command="finetune")
    msg = str(e.value)
    assert "train.steps: expected an integer, got 'ten'" in msg
    assert "optimizer.momentum: must be in [0, 1), got 1.5" in msg
    assert "no output directory: pass --out DIR" in msg and "no training data: pass --data" in msg
    assert len(e.value.problems) == 4


def test_a_key_with_a_type_problem_is_reported_once():
    with pytest.raises(ConfigError) as e:
        C.resolve(overrides=["optimizer.betas=[0.9, x]", "lora.rank=two"])
    assert [p.split(":")[0] for p in e.value.problems] == ["optimizer.betas[1]", "lora.rank"]


def test_clip_zero_means_off_in_every_spelling(tmp_path):
    assert C.resolve(overrides=["train.clip=0"]).train.clip is None
    assert C.resolve(flags={"train.clip": 0.0}).train.clip is None
    assert C.resolve(overrides=["train.clip=null"]).train.clip is None
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  clip: 0\n")
    assert C.resolve(p).train.clip is None and C.from_dict({"train": {"clip": 0}}).train.clip is None
    assert C.resolve(overrides=["train.clip=0.5"]).train.clip == 0.5
    with pytest.raises(ConfigError, match=r"train.clip: must be >= 0, got -1"):
        C.resolve(overrides=["train.clip=-1"])


def test_threads_key_defaults_to_torchs_choice():
    assert C.RunConfig().train.threads is None
    assert C.resolve(overrides=["train.threads=3"]).train.threads == 3
    with pytest.raises(ConfigError, match=r"train.threads: must be > 0"):
        C.resolve(overrides=["train.threads=0"])


def test_an_added_key_at_its_default_keeps_old_sweep_hashes():
    """`train.threads` (added with default null) must not change a sweep cell's config hash, or every old sweep
    would re-run from scratch. The hashes are the ones muonft computed before the key existed (same recipe);
    a non-default value is part of the cell's config and hashes like any other key."""
    from muonft_cli.sweep.plan import load_plan

    cells = {c.id: c.hash for c in load_plan("recipe:mismatch-small").cells}
    assert cells["adam-full-adamw-lr0.001-s0"] == "53ec42f05fee"
    assert cells["adam-full-adamw-lr0.001-s1"] == "38ea65c7f091"
    other = {c.id: c.hash for c in load_plan("recipe:mismatch-small", ["train.threads=2"]).cells}
    assert other["adam-full-adamw-lr0.001-s0"] != "53ec42f05fee"
