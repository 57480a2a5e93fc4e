"""Run configuration: nested dataclasses mirrored 1:1 by the YAML recipes in `recipes/`.

One `RunConfig` holds everything a `pretrain` / `finetune` / `eval` run needs. It is built from (in order)
the dataclass defaults, a YAML recipe (`--config`), dedicated CLI flags, and generic `--set key.path=value`
overrides; the resolved config is what runs and is saved as `config.yaml` in every run directory.

Loading is strict (the torchtune flaw of silently adding mistyped keys is avoided): an unknown key is an
error with a did-you-mean suggestion, types and ranges are checked, and every problem is reported at once
in one `ConfigError` (litgpt's `validate_args` habit).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from muonft_cli import recipes
from muonft_cli._common import (AUTO_OPTIMIZER, OPTIMIZER_NAMES, SCALINGS, adamw_lr_problem, atomic_write_text,
                                first_line)
from muonft_cli.errors import ConfigError, UserInputError

LORA_VARIANTS = ("lora", "rslora", "dora", "pissa", "olora")
DTYPES = ("fp32", "bf16")
#: `model.base_dtype` / `--base-dtype`: the dtype the frozen base of a LoRA run is loaded in (auto: bf16 on CUDA,
#: fp32 on CPU; resolved in `muonft_cli.models.device.resolve_base_dtype`).
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: `train.strategy` under torchrun: replicate (DDP) or shard (FSDP2) weights, gradients and optimizer state.
STRATEGIES = ("ddp", "fsdp")
PRESETS = ("tiny", "small")
#: `train.report_to` / `--report-to` backends (`none` = none; implemented in `muonft_cli.train.report_to`).
REPORT_BACKENDS = ("none", "tensorboard", "wandb")
#: `optimizer.trust_norm` values (`auto`: from the base's pretraining optimizer, `muonft_cli.diagnose.auto`)
TRUST_NORMS = ("auto", "spectral", "max")


@dataclass
class ModelConfig:
    """Which model to start from (finetune/eval) or build (pretrain)."""

    name_or_path: str | None = field(default=None, metadata={"help": "local HF dir, .gguf file, or hub id"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path/id (default: the model's)"})
    preset: str | None = field(default=None, metadata={"help": "pretrain: tiny | small Llama config"})
    model_config: str | None = field(default=None, metadata={"help": "pretrain: path to a config.json"})
    vocab_size: int = field(default=4096, metadata={"help": "pretrain: BPE vocabulary size when training one"})
    dtype: str = field(default="fp32", metadata={"help": "fp32 | bf16 (bf16 autocast on CUDA; CPU runs stay fp32)"})
    base_dtype: str = field(default="auto", metadata={
        "help": "auto | fp32 | bf16 | fp16: dtype the frozen base of a LoRA run is loaded in (LoRA weights and "
                "optimizer state stay fp32); auto = bf16 on CUDA, fp32 on CPU; full fine-tuning: fp32 only"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; pip install 'muonft[qlora]')"})
    trust_remote_code: bool = False
    offline: bool = field(default=False, metadata={"help": "never contact the hub (sets HF_HUB_OFFLINE=1)"})


@dataclass
class DataConfig:
    """Training/validation text."""

    path: str | None = field(default=None, metadata={"help": "builtin:NAME, local file/folder, or hub dataset"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence (>= 2: N tokens give N-1 targets)"})
    val_fraction: float = field(default=0.05, metadata={"help": "hold-out fraction of documents"})
    text_field: str | None = field(default=None, metadata={"help": "column holding plain text (auto if None)"})
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents"})
    max_dropped_fraction: float = field(default=0.1, metadata={"help": "largest share of records that may "
                                                                       "lack the text fields (dropped) before "
                                                                       "it is an error"})
    split_seed: int | None = field(default=None, metadata={"help": "seed of the validation hold-out "
                                                                   "(default: train.seed)"})


@dataclass
class LoraConfig:
    """LoRA through peft. `rank: null` means full fine-tuning."""

    rank: int | None = None
    alpha: float | None = field(default=None, metadata={"help": "default 2 x rank"})
    dropout: float = 0.0
    targets: list[str] | None = field(default=None, metadata={"help": "default: all linear but emb/head"})
    variant: str = "lora"
    merge: bool = field(default=False, metadata={"help": "also write the merged model"})


@dataclass
class OptimizerConfig:
    """Optimizer settings, consumed by `muonft_cli.optim.build_optimizer`."""

    name: str = "adamw"  # or `auto` (a requested name: `muonft_cli.diagnose.auto` resolves it before training)
    lr: float = 1e-4  # None only for `auto` without a given lr (resolve sets it; auto picks it)
    weight_decay: float = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scaling: str = "match_rms_adamw"
    ns_steps: int = 5
    ns_dtype: str = "auto"
    adamw_lr: float | None = field(default=None, metadata={"help": "Muon's auxiliary AdamW group lr"})
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lora_a: str = field(default="muon", metadata={"help": "muon | adamw: where LoRA A matrices go"})
    # mismatch mitigations for full fine-tuning (`muonft_cli.optim.constraints`; docs/formulas.md), all off
    anchor_decay: float = field(default=0.0, metadata={"help": "λ of W <- W - lr·λ·(W - W0), decay toward the "
                                                               "pretrained weights W0 (L2-SP); 0 = off"})
    trust_radius: float | None = field(default=None, metadata={"help": "ρ: keep ||W - W0|| <= ρ·||W0|| in "
                                                                       "trust_norm (projection); null = off"})
    trust_norm: str = field(default="auto", metadata={"help": "auto | spectral | max: the trust region's norm; "
                                                              "auto = spectral for a Muon-pretrained base, max "
                                                              "for an Adam-pretrained one"})
    update_rank: int | None = field(default=None, metadata={"help": "muon/muon-pe: apply only the top-k "
                                                                    "directions of each update; null = full"})


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine decay to `min_lr_ratio` x lr."""

    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int | None = field(default=None, metadata={"help": "optimizer steps (or use epochs)"})
    epochs: float | None = None
    batch_size: int = field(default=8, metadata={"help": "global batch, in sequences"})
    micro_batch_size: int = 8
    seed: int = 0
    clip: float | None = field(default=1.0, metadata={"help": "grad-norm clip on raw grads; 0 or null = off"})
    eval_every: int = 50
    save_every: int | None = field(default=None, metadata={
        "help": "checkpoint every N steps; null = auto (every 10 % of the steps, and every save_every_minutes); "
                "0 = off"})
    save_every_minutes: float = field(default=10.0, metadata={
        "help": "with save_every auto (null): also checkpoint when this many minutes passed since the last "
                "checkpoint; 0 = off"})
    keep_last: int = 2
    gradient_checkpointing: bool = False
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads); null = "
                                                                "torch's default"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "logging backends beside metrics.jsonl: tensorboard (OUT/tb/), wandb (OUT/wandb/); [] or none = "
                "no backend"})
    run_name: str | None = field(default=None, metadata={
        "help": "the run's name in the logging backends (W&B run name); null = the --out directory's name"})
    strategy: str = field(default="ddp", metadata={
        "help": "under torchrun: ddp (weights, gradients and optimizer state replicated) | fsdp (FSDP2 "
                "fully_shard, sharded Muon); a single process runs unsharded either way"})


@dataclass
class EvalConfig:
    """Evaluation settings."""

    batch_size: int = 8
    max_batches: int | None = None
    reference_data: str | None = field(default=None, metadata={"help": "forgetting: reference dataset"})


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str | None = None
    overwrite: bool = False


@dataclass
class RunConfig:
    """Everything one run needs; mirrored 1:1 by the YAML recipes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------------------------- helpers


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`, converting where loss-free (int -> float, str numbers)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = sorted((a for a in args if a is not type(None)), key=lambda a: not _shaped_like(value, a))
        first: tuple[list[str], Any] | None = None
        for a in inner:
            sub: list[str] = []
            out = _coerce(value, a, where, sub)
            if not sub:
                return out
            first = first or (sub, out)
        if first is None:
            problems.append(f"{where}: invalid value {value!r}")
            return value
        problems.extend(first[0])  # the problems of the alternative shaped like the value, and what it loaded
        return first[1]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return value
        _, val_tp = args or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
                            f", got {value!r}")
            return value
        obj = tp()
        _apply_mapping(obj, value, f"{where}.", problems)
        return obj
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (float, int):
        return _coerce_number(value, tp, where, problems)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _shaped_like(value: Any, tp: Any) -> bool:
    """Whether `value` has the container shape of annotation `tp` (a union reports that alternative's problem)."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    if isinstance(value, (list, tuple)):
        return origin is list
    return origin not in (dict, list) and not dataclasses.is_dataclass(tp)


def _coerce_number(value: Any, tp: type, where: str, problems: list[str]) -> Any:
    """int/float fields: accept numbers and numeric strings (an int field takes integral floats only)."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        elif tp is float and isinstance(value, (int, float)):
            return float(value)
        elif tp is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return int(value)
    problems.append(f"{where}: expected {what}, got {value!r}")
    return value


def _apply_mapping(obj: Any, data: dict, prefix: str, problems: list[str]) -> None:
    """Set fields of dataclass `obj` from `data`, recursing into nested dataclasses; collect problems."""
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
        return
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key '{where}'{_did_you_mean(str(key), names)}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value, f"{where}.", problems)
        else:
            setattr(obj, key, _coerce(value, hints[key], where, problems))


def _range_problems(cfg: RunConfig) -> list[str]:
    p: list[str] = []

    def choice(where: str, value: Any, options: tuple) -> None:
        if value is not None and value not in options:
            p.append(f"{where}: {value!r} is not one of {', '.join(options)}{_did_you_mean(str(value), options)}")

    def positive(where: str, value: Any, allow_zero: bool = False) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0 or (value == 0 and not allow_zero):
                p.append(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    choice("optimizer.name", cfg.optimizer.name, OPTIMIZER_NAMES + (AUTO_OPTIMIZER,))
    choice("optimizer.scaling", cfg.optimizer.scaling, SCALINGS)
    choice("optimizer.ns_dtype", cfg.optimizer.ns_dtype, ("auto", "bf16", "fp32"))
    choice("optimizer.lora_a", cfg.optimizer.lora_a, ("muon", "adamw"))
    choice("optimizer.trust_norm", cfg.optimizer.trust_norm, TRUST_NORMS)
    positive("optimizer.anchor_decay", cfg.optimizer.anchor_decay, allow_zero=True)
    if cfg.optimizer.trust_radius is not None:
        positive("optimizer.trust_radius", cfg.optimizer.trust_radius)
    if cfg.optimizer.update_rank is not None:
        positive("optimizer.update_rank", cfg.optimizer.update_rank)
        if cfg.optimizer.name not in ("muon", "muon-pe", AUTO_OPTIMIZER):
            p.append(f"optimizer.update_rank: limits Muon's update, so it needs optimizer.name muon or muon-pe "
                     f"(got {cfg.optimizer.name}); unset it")
    choice("lora.variant", cfg.lora.variant, LORA_VARIANTS)
    choice("model.dtype", cfg.model.dtype, DTYPES)
    choice("model.base_dtype", cfg.model.base_dtype, BASE_DTYPES)
    choice("model.preset", cfg.model.preset, PRESETS)
    choice("train.strategy", cfg.train.strategy, STRATEGIES)
    positive("optimizer.lr", cfg.optimizer.lr)
    if cfg.optimizer.adamw_lr is not None:
        positive("optimizer.adamw_lr", cfg.optimizer.adamw_lr)
    positive("optimizer.weight_decay", cfg.optimizer.weight_decay, allow_zero=True)
    positive("optimizer.eps", cfg.optimizer.eps)
    positive("optimizer.ns_steps", cfg.optimizer.ns_steps)
    if isinstance(cfg.optimizer.momentum, float) and not 0 <= cfg.optimizer.momentum < 1:
        p.append(f"optimizer.momentum: must be in [0, 1), got {cfg.optimizer.momentum}")
    for name in ("betas", "adamw_betas"):
        betas = getattr(cfg.optimizer, name)
        if isinstance(betas, list) and (
            len(betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1 for b in betas)
        ):
            p.append(f"optimizer.{name}: expected two numbers in [0, 1), got {betas}")
    if cfg.lora.rank is not None:
        if isinstance(cfg.lora.rank, int) and cfg.lora.rank < 1:
            p.append(f"lora.rank: must be >= 1 (or null for full fine-tuning), got {cfg.lora.rank}")
    if cfg.lora.alpha is not None:
        positive("lora.alpha", cfg.lora.alpha)
    if isinstance(cfg.lora.dropout, float) and not 0 <= cfg.lora.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    for where, value in (("schedule.warmup_ratio", cfg.schedule.warmup_ratio),
                         ("schedule.min_lr_ratio", cfg.schedule.min_lr_ratio),
                         ("data.val_fraction", cfg.data.val_fraction)):
        if isinstance(value, float) and not 0 <= value <= 1:
            p.append(f"{where}: must be in [0, 1], got {value}")
    if cfg.data.val_fraction == 1:
        p.append("data.val_fraction: 1 leaves no training data; use a fraction below 1 (e.g. 0.05)")
    if isinstance(cfg.data.seq_len, int) and cfg.data.seq_len < 2:
        p.append(f"data.seq_len: must be >= 2 (a sequence of N tokens has N-1 next-token targets, so "
                 f"{cfg.data.seq_len} leaves nothing to learn or score), got {cfg.data.seq_len}")
    positive("model.vocab_size", cfg.model.vocab_size)
    if cfg.data.max_documents is not None:
        positive("data.max_documents", cfg.data.max_documents)
    if isinstance(cfg.data.max_dropped_fraction, float) and not 0 <= cfg.data.max_dropped_fraction <= 1:
        p.append(f"data.max_dropped_fraction: must be in [0, 1], got {cfg.data.max_dropped_fraction}")
    if cfg.train.steps is not None:
        positive("train.steps", cfg.train.steps)
    if cfg.train.epochs is not None:
        positive("train.epochs", cfg.train.epochs)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.micro_batch_size", cfg.train.micro_batch_size)
    positive("train.seed", cfg.train.seed, allow_zero=True)
    if cfg.train.clip is not None:
        positive("train.clip", cfg.train.clip, allow_zero=True)  # 0 = off, like null (see _normalize)
    if cfg.train.threads is not None:
        positive("train.threads", cfg.train.threads)
    if isinstance(cfg.train.report_to, list):
        for i, name in enumerate(cfg.train.report_to):
            choice(f"train.report_to[{i}]", name, REPORT_BACKENDS)
    positive("train.eval_every", cfg.train.eval_every, allow_zero=True)
    positive("train.save_every", cfg.train.save_every, allow_zero=True)
    positive("train.save_every_minutes", cfg.train.save_every_minutes, allow_zero=True)
    positive("train.keep_last", cfg.train.keep_last)
    positive("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.max_batches is not None:
        positive("eval.max_batches", cfg.eval.max_batches)
    bs, mbs = cfg.train.batch_size, cfg.train.micro_batch_size
    if isinstance(bs, int) and isinstance(mbs, int) and bs > 0 and mbs > 0 and mbs > bs:
        p.append(f"train.micro_batch_size ({mbs}) must not exceed train.batch_size ({bs})")
    problem = adamw_lr_problem(cfg.optimizer.name, cfg.optimizer.scaling, cfg.optimizer.adamw_lr)
    if problem:
        p.append(problem)
    return p


def _normalize(cfg: RunConfig) -> RunConfig:
    """One meaning per setting, whatever the spelling: `train.clip` 0 (`--clip 0`, `--set train.clip=0`) is off,
    stored as null; `train.report_to` drops `none` and repeats."""
    if cfg.train.clip == 0 and not isinstance(cfg.train.clip, bool):
        cfg.train.clip = None
    if isinstance(cfg.train.report_to, list):  # `none` = no backend; each backend once, in the order given
        cfg.train.report_to = list(dict.fromkeys(b for b in cfg.train.report_to if b != "none"))
    return cfg


def _key_of(problem: str) -> str:
    """The config key a problem line is about (`optimizer.lr: ...` -> `optimizer.lr`)."""
    key = problem.split(":")[0].strip()
    key = key[len("unknown key "):].strip("'") if key.startswith("unknown key ") else key.split(" ")[0]
    return key.split("[")[0]  # optimizer.betas[0] -> optimizer.betas


def _all_problems(cfg: RunConfig, typed: list[str]) -> list[str]:
    """The type problems, then the range problems of every key that loaded (a key with a type problem is
    reported once, by its type problem): everything wrong, in one pass."""
    bad = {_key_of(q) for q in typed}
    return list(typed) + [q for q in _range_problems(cfg) if _key_of(q) not in bad]


#: The inputs each command cannot run without, and how to give them (reported with every other config problem).
REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {
    "pretrain": (("output.dir", "no output directory: pass --out DIR (or set output.dir in the recipe)"),
                 ("data.path", "no training data: pass --data builtin:shakespeare, a local file/folder or a hub "
                               "dataset name")),
    "finetune": (("output.dir", "no output directory: pass --out DIR (or set output.dir in the recipe)"),
                 ("data.path", "no training data: pass --data builtin:shakespeare, a local file/folder or a hub "
                               "dataset name"),
                 ("model.name_or_path", "no model to fine-tune: pass --model PATH (a local HF dir, a .gguf file, "
                                        "a run's final/ dir) or a hub id")),
}


def missing_inputs(cfg: RunConfig, command: str) -> list[str]:
    """The `REQUIRED` inputs of `command` that `cfg` lacks, as problem lines ([] when none or unknown command)."""
    out = []
    for key, message in REQUIRED.get(command, ()):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            out.append(message)
    return out


# --------------------------------------------------------------------------------------------- public API


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and choices; raise one `ConfigError` listing every problem."""
    problems = _range_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return _normalize(cfg)


def from_dict(data: dict | None, base: RunConfig | None = None) -> RunConfig:
    """Build a validated `RunConfig` from a nested mapping (unknown keys are errors)."""
    cfg = base if base is not None else RunConfig()
    problems: list[str] = []
    _apply_mapping(cfg, data or {}, "", problems)
    problems = _all_problems(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return _normalize(cfg)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (what `config.yaml` holds)."""
    return dataclasses.asdict(cfg)


#: Keys added to the schema after sweeps were first run, with the default that means "as before the key
#: existed". `stable_view` leaves them out at that default, so a sweep cell's config hash (which decides what a
#: restarted sweep re-runs) is the one an older muonft computed: old sweeps still resume.
ADDED_KEYS: dict[str, Any] = {"train.threads": None, "data.max_dropped_fraction": 0.1, "train.report_to": [],
                              "train.run_name": None, "model.base_dtype": "auto", "model.load_in_4bit": False,
                              "train.strategy": "ddp", "optimizer.anchor_decay": 0.0, "optimizer.trust_radius": None,
                              "optimizer.trust_norm": "auto", "optimizer.update_rank": None}


def stable_view(data: dict) -> dict:
    """A config mapping (`to_dict` shape, or any part of a recipe) as sweep hashes see it: the `ADDED_KEYS` that
    hold their default are left out, and checkpoint cadence, which never changes a result, hashes as the old
    default (`save_every: null` → 0, `save_every_minutes` left out), so sweeps written before these keys resume;
    the logging backends (`report_to`, `run_name`) never change a result either and are always left out."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, default in ADDED_KEYS.items():
        section, name = key.split(".")
        sec = out.get(section)
        if isinstance(sec, dict) and name in sec and sec[name] == default:
            del sec[name]
    train = out.get("train")
    if isinstance(train, dict):
        train.pop("save_every_minutes", None)
        train.pop("report_to", None)
        train.pop("run_name", None)
        if "save_every" in train and train["save_every"] is None:
            train["save_every"] = 0
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (a file, or `recipe:NAME` for a shipped recipe), with one-line errors for
    missing/unparsable files and unknown recipe names."""
    ref = recipes.is_recipe_ref(path)
    p = Path(path).expanduser()
    if ref:
        recipes.name_of(str(path))  # an unknown name: one line listing the shipped ones
    elif not p.is_file():
        raise UserInputError(f"config file '{path}' does not exist: pass the path of a YAML recipe, or "
                             f"recipe:NAME for a shipped one (`muonft recipes` lists them)")
    try:
        data = yaml.safe_load(recipes.read_text(str(path)) if ref else p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise UserInputError(f"config file '{path}' is not valid YAML ({first}): fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"config file '{path}' must hold a mapping of sections (model:, data:, ...)")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `key.path=value` override; the value is read as YAML (numbers, lists, null, true)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key.path=value, e.g. --set optimizer.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{item}': the key is empty; expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string (no dot); accept it as the float it means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def nest(path: list[str], value: Any) -> dict:
    """`["a", "b"], v` -> `{"a": {"b": v}}`."""
    out: dict = {}
    cur = out
    for part in path[:-1]:
        cur = cur.setdefault(part, {})
    cur[path[-1]] = value
    return out


def merge_dicts(a: dict, b: dict) -> dict:
    """Deep-merge `b` into a copy of `a`."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def resolve(
    recipe: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    command: str | None = None,
) -> RunConfig:
    """Build the config that runs: defaults <- `base` <- recipe <- flags <- `--set` overrides.

    Args:
        recipe: path of a YAML recipe, or None.
        flags: dedicated CLI flags as `{"optimizer.lr": 3e-4, ...}`; entries whose value is None are ignored.
        overrides: `--set key.path=value` strings, applied last.
        base: command-specific defaults applied before the recipe (e.g. pretrain's larger lr).
        command: "pretrain" / "finetune": also report the inputs it requires (`REQUIRED`) that are missing.

    Returns:
        The validated `RunConfig`. Raises `ConfigError` listing every problem at once: unparsable overrides,
        unknown keys, types, ranges and missing required inputs together.
    """
    data: dict = dict(base or {})
    if recipe is not None:
        data = merge_dicts(data, read_yaml(recipe))
    for key, value in (flags or {}).items():
        if value is not None:
            data = merge_dicts(data, nest(key.split("."), value))
    problems: list[str] = []
    for item in overrides or []:
        try:
            path, value = parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        data = merge_dicts(data, nest(path, value))
    cfg = RunConfig()
    _apply_mapping(cfg, data, "", problems)
    problems = _all_problems(cfg, problems) + (missing_inputs(cfg, command) if command else [])
    if problems:
        raise ConfigError(problems)
    if cfg.optimizer.name == AUTO_OPTIMIZER and "lr" not in (data.get("optimizer") or {}):
        cfg.optimizer.lr = None  # type: ignore[assignment]  # auto without an lr: `diagnose.auto` picks it
    return _normalize(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_saved(path: str | Path) -> RunConfig:
    """Load a `config.yaml` written by `save_yaml` back into a `RunConfig`."""
    return from_dict(read_yaml(path))


def diff(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two configs, as `key: a -> b` lines (for resume checks)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
            return
        key = prefix[:-1]
        if key not in ignore and x != y:
            out.append(f"{key}: {x!r} -> {y!r}")

    walk(to_dict(a), to_dict(b), "")
    return out


# --------------------------------------------------------------------------------- the sweep section
# The `sweep:` section of a `muonft sweep` recipe, loaded by the same strict loader as the run config (unknown
# key -> did-you-mean, every problem at once). Its expansion into cells lives in `muonft_cli.sweep.plan`.

SWEEP_METHODS = ("full", "lora")
SWEEP_METRICS = ("final", "best")


@dataclass
class SweepBaseSection:
    """One base model: `path` (a local model or hub id) or `pretrain` (a run recipe the sweep runs first)."""

    path: str | None = None
    pretrain: dict[str, Any] | None = field(default=None, metadata={"help": "a pretrain run recipe"})
    pretrained_with: str | None = field(default=None, metadata={"help": "the optimizer that pretrained it"})
    label: str | None = None


@dataclass
class SweepWhere:
    """Which cells of the grid a variant applies to (unset = any): methods, optimizers, bases, and whether the
    optimizer matches the base's pretraining optimizer (`matched: false` = the mismatched cells)."""

    methods: list[str] | None = None
    optims: list[str] | None = None
    bases: list[str] | None = None
    matched: bool | None = None


@dataclass
class SweepVariant:
    """Extra cells: the grid cells matching `where`, again, with the run overrides `set` ({key.path: value})."""

    name: str | None = field(default=None, metadata={"help": "the row label and cell-id part"})
    where: SweepWhere | None = None
    set: dict[str, Any] | None = field(default=None, metadata={"help": "config.key -> value for these cells"})
    lr: list[float] | None = field(default=None, metadata={"help": "their LRs (default: the cell's own grid)"})


@dataclass
class SweepSection:
    """The `sweep:` section: the grid (bases x methods x optimizers x LRs x ranks x seeds x extra axes), and
    variants (some of its cells again, with overrides)."""

    name: str | None = field(default=None, metadata={"help": "default: the recipe file's stem"})
    bases: dict[str, SweepBaseSection] | None = None
    methods: list[str] = field(default_factory=lambda: ["full", "lora"])
    optims: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    lr: dict[str, dict[str, list[float]] | list[float]] | list[float] | None = field(
        default=None, metadata={"help": "{method: {optim: [..]}}, {method: [..]}, or one list for all"})
    lora_ranks: list[int] = field(default_factory=lambda: [8])
    alpha_equals_2r: bool = field(default=True, metadata={"help": "lora.alpha = 2 x rank"})
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] | None = field(default=None, metadata={"help": "config.key -> values"})
    metric: str = field(default="final", metadata={"help": "final | best validation PPL of a run"})
    reference_data: str | None = field(default=None, metadata={"help": "forgetting (default: eval.reference_data)"})
    per_optim: dict[str, dict[str, Any]] | None = field(default=None, metadata={"help": "optim -> run overrides"})
    variants: list[SweepVariant] | None = field(default=None, metadata={
        "help": "extra cells beside the grid: the cells matching `where`, with the overrides `set`"})


def _sweep_problems(sec: SweepSection) -> list[str]:
    """The sweep section's choices, ranges, duplicates and missing learning rates (after type checks)."""
    p: list[str] = []

    def grid(where: str, values: Any, options: tuple | None = None, positive: bool = False,
             allow_zero: bool = False) -> None:
        if not isinstance(values, list) or not values:
            p.append(f"{where}: expected a non-empty list, got {values!r}")
            return
        for i, v in enumerate(values):
            if options is not None and v not in options:
                p.append(f"{where}[{i}]: {v!r} is not one of {', '.join(options)}{_did_you_mean(str(v), options)}")
            elif positive and isinstance(v, (int, float)) and (v < 0 or (v == 0 and not allow_zero)):
                p.append(f"{where}[{i}]: must be {'>= 0' if allow_zero else '> 0'}, got {v}")
        if len({repr(v) for v in values}) != len(values):
            p.append(f"{where}: has duplicate values {values!r}")

    def keys(where: str, mapping: Any, options: tuple) -> None:
        for k in mapping if isinstance(mapping, dict) else ():
            if k not in options:
                p.append(f"unknown key '{where}.{k}'{_did_you_mean(str(k), options)}")

    if not isinstance(sec.bases, dict) or not sec.bases:
        p.append("sweep.bases: expected a mapping name -> {path: ...} or {pretrain: {...}}, e.g. "
                 "bases: {adam: {path: runs/pre-adam/final, pretrained_with: adamw}}")
    else:
        for name, b in sec.bases.items():
            if not isinstance(b, SweepBaseSection):
                continue
            if (b.path is None) == (b.pretrain is None):
                p.append(f"sweep.bases.{name}: give exactly one of 'path' (an existing model) or 'pretrain' "
                         "(a run recipe)")
            elif b.path is not None and not b.path:
                p.append(f"sweep.bases.{name}.path: expected a model path or hub id, got {b.path!r}")
            if b.pretrained_with is not None and b.pretrained_with not in OPTIMIZER_NAMES:
                p.append(f"sweep.bases.{name}.pretrained_with: {b.pretrained_with!r} is not one of "
                         f"{', '.join(OPTIMIZER_NAMES)}{_did_you_mean(str(b.pretrained_with), OPTIMIZER_NAMES)}")
    grid("sweep.methods", sec.methods, SWEEP_METHODS)
    requested = OPTIMIZER_NAMES + (AUTO_OPTIMIZER,)  # `auto`: each cell decides from its base (`diagnose.auto`)
    grid("sweep.optims", sec.optims, requested)
    grid("sweep.lora_ranks", sec.lora_ranks, positive=True)
    grid("sweep.seeds", sec.seeds, positive=True, allow_zero=True)
    if sec.metric not in SWEEP_METRICS:
        p.append(f"sweep.metric: {sec.metric!r} is not one of {', '.join(SWEEP_METRICS)}"
                 f"{_did_you_mean(str(sec.metric), SWEEP_METRICS)}")
    for k in sec.per_optim if isinstance(sec.per_optim, dict) else ():
        if k not in requested:
            p.append(f"sweep.per_optim.{k}: not an optimizer ({', '.join(requested)})"
                     f"{_did_you_mean(str(k), requested)}")
    for key, values in (sec.axes or {}).items() if isinstance(sec.axes, dict) else ():
        if not isinstance(values, list) or not values:
            p.append(f"sweep.axes.{key}: expected a non-empty list of values, got {values!r}")
    for i, v in enumerate(sec.variants) if isinstance(sec.variants, list) else ():
        where = f"sweep.variants[{i}]"
        if not isinstance(v, SweepVariant):
            continue
        if not v.name or any(not (c.isalnum() or c in "-_.+=") for c in str(v.name)):
            p.append(f"{where}.name: give each variant a name of letters, digits and -_.+= (it labels its rows and "
                     f"cell ids), got {v.name!r}")
        if not v.set:
            p.append(f"{where}.set: expected a mapping config.key -> value, e.g. set: {{optimizer.anchor_decay: 0.1}}")
        w = v.where
        if isinstance(w, SweepWhere):
            if w.methods is not None:
                grid(f"{where}.where.methods", w.methods, SWEEP_METHODS)
            if w.optims is not None:
                grid(f"{where}.where.optims", w.optims, requested)
            if w.bases is not None and isinstance(sec.bases, dict):
                grid(f"{where}.where.bases", w.bases, tuple(sec.bases))
        if v.lr is not None:
            grid(f"{where}.lr", v.lr, positive=True)
    if sec.lr is None:
        p.append("sweep.lr: missing; give the LR grid per method and optimizer, e.g. "
                 "lr: {full: {adamw: [1e-5, 3e-5]}, lora: {adamw: [1e-4, 3e-4]}}")
        return p
    keys("sweep.lr", sec.lr, SWEEP_METHODS)
    for m in sec.methods if isinstance(sec.methods, list) else ():
        if m not in SWEEP_METHODS:
            continue
        per_m = sec.lr.get(m) if isinstance(sec.lr, dict) else sec.lr
        if per_m is None:
            p.append(f"sweep.lr.{m}: missing; give a list of learning rates for method '{m}'")
            continue
        keys(f"sweep.lr.{m}", per_m, requested)
        for o in sec.optims if isinstance(sec.optims, list) else ():
            if o not in requested:
                continue
            values = per_m.get(o) if isinstance(per_m, dict) else per_m
            if values is None:
                p.append(f"sweep.lr.{m}.{o}: missing; give a list of learning rates for {m} fine-tuning with {o}")
            else:
                grid(f"sweep.lr.{m}.{o}", values, positive=True)
    return p


def load_sweep_section(data: Any) -> tuple[SweepSection, list[str]]:
    """Load a recipe's `sweep:` mapping strictly, like the run config; returns it and every problem found.

    The problems are returned rather than raised so that the sweep can report them together with those of the
    run sections and of each cell (`muonft_cli.sweep.plan.plan_from_dict`).
    """
    sec = SweepSection()
    problems: list[str] = []
    _apply_mapping(sec, data, "sweep.", problems)
    typed = {q.split(":")[0] for q in problems}  # type errors first; range checks of what else loaded
    problems.extend(q for q in _sweep_problems(sec) if q.split(":")[0] not in typed)
    return sec, problems
