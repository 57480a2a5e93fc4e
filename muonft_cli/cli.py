"""The `muonft` command line: Typer only. Each command parses, builds a config, calls the engine, prints.

torch / transformers are imported inside the commands (through the engine modules), so `muonft --help`
and `muonft --version` stay instant. Domain errors from the engine (`muonft_cli.errors`) become one line
on stderr and an exit code (2: bad input, 1: failure during work) here, and only here. Every `--json` document
goes through `_common.json_dumps` (strict JSON: no NaN/Infinity, a status field); a stdout pipe closed by its
reader (`muonft ... | head`) ends the command quietly with exit 0 (`_App`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import typer

from muonft_cli import __version__
from muonft_cli.errors import MuonftError


class _App(typer.Typer):
    """The Typer app, ending quietly (exit 0) when stdout is a pipe closed early (`muonft ... | head`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_devnull = _stdout_is_devnull()
        try:
            return super().__call__(*args, **kwargs)
        except BrokenPipeError:
            _stdout_to_devnull()
            raise SystemExit(0) from None
        except SystemExit as e:
            # a broken stdout pipe becomes exit 1 in the libraries: typer (its vendored click) wraps stdout in
            # click's PacifyFlushWrapper, rich (help, tables) points stdout at /dev/null itself
            if e.code == 1 and (type(sys.stdout).__name__ == "PacifyFlushWrapper"
                                or (_stdout_is_devnull() and not was_devnull)):
                _stdout_to_devnull()
                raise SystemExit(0) from None
            raise


def _stdout_is_devnull() -> bool:
    import os

    try:
        return os.path.samestat(os.fstat(sys.__stdout__.fileno()), os.stat(os.devnull))
    except (OSError, AttributeError, ValueError):
        return False


def _stdout_to_devnull() -> None:
    """The usual recipe for a closed stdout: point fd 1 at /dev/null so the interpreter's last flush is silent."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, AttributeError, ValueError):
        pass


app = _App(
    name="muonft",
    help="Fine-tune pretrained models with Muon without falling into the optimizer-mismatch trap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"muonft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="On an internal error, show the full traceback (also: MUONFT_DEBUG=1)."
    ),
) -> None:
    """muonft: pretrain, fine-tune, sweep, evaluate and diagnose with Adam or Muon."""
    if debug:
        import os

        os.environ["MUONFT_DEBUG"] = "1"  # inherited by the processes a sweep starts
    # transformers 5 deprecation noise that peft triggers on every model; not actionable by our users
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an engine function; turn domain errors into one line on stderr and their exit code."""
    try:
        return fn(*args, **kwargs)
    except MuonftError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as e:  # not a domain error: a bug in muonft (or a library), never the user's fault
        import os

        if os.environ.get("MUONFT_DEBUG", "").strip() not in ("", "0"):
            raise
        from muonft_cli._common import first_line

        typer.echo(f"error: internal error ({type(e).__name__}: {first_line(e)}); this is a bug in muonft: "
                   "rerun with --debug (or MUONFT_DEBUG=1) for the traceback and report it", err=True)
        raise typer.Exit(1) from None


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _json(obj: Any, status: bool = True) -> None:
    """Print one strict-JSON document on stdout (never NaN/Infinity: null, and a status field; `_common`)."""
    from muonft_cli._common import json_dumps

    typer.echo(json_dumps(obj, status=status))


def _quiet_libraries() -> None:
    """`--quiet`: also silence the libraries' own bars and notices (call before the engine imports them): tqdm
    bars (transformers' GGUF dequantisation), huggingface_hub's download bars, transformers' bars, and peft's
    "Could not find a config file" warning (it cannot check a local GGUF base's vocabulary; harmless)."""
    import os

    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when imported: the engine imports it after this
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    warnings.filterwarnings("ignore", message="Could not find a config file")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cpu_dtype_note(cfg: Any) -> None:
    """`--dtype bf16` is bf16 autocast on CUDA only: say so when this run will compute on the CPU."""
    if cfg.model.dtype != "bf16":
        return
    dev = str(cfg.train.device or "auto").strip().lower()
    if dev == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        typer.echo("note: --dtype bf16 only affects CUDA runs; this CPU run computes in fp32", err=True)


# ------------------------------------------------------------ pretrain / finetune (engine: muonft_cli.train)

_PRETRAIN_BASE = {"optimizer": {"lr": 1e-3}}


def _plan_cmd(mode: str, flags: dict[str, Any], config: Optional[str], overrides: Optional[list[str]],
              plan_opts: dict[str, Any], as_json: bool) -> None:
    """`pretrain` / `finetune` with --plan: the memory plan of that run, printed; nothing is written."""
    from muonft_cli import config as cfgmod

    cfg = _run(cfgmod.resolve, config, flags, overrides, _PRETRAIN_BASE if mode == "pretrain" else None)
    from muonft_cli import plan_memory, render

    gpu = _run(plan_memory.parse_bytes, plan_opts["gpu_memory"]) if plan_opts["gpu_memory"] else None
    plan = _run(plan_memory.plan_memory, cfg, mode, world_size=plan_opts["world_size"], gpu_memory=gpu)
    if as_json:
        _json(plan)
    else:
        render.print_plan(plan)


def _train_cmd(mode: str, flags: dict[str, Any], config: Optional[str], overrides: Optional[list[str]],
               resume: bool, as_json: bool, quiet: bool, plan_opts: Optional[dict[str, Any]] = None) -> None:
    """Shared body of `pretrain` / `finetune`: flags -> config -> train.run -> print (or, with --plan, the
    memory plan)."""
    import os
    from pathlib import Path

    from muonft_cli import config as cfgmod

    if plan_opts and plan_opts["plan"]:
        return _plan_cmd(mode, flags, config, overrides, plan_opts, as_json)
    if plan_opts and (plan_opts["world_size"] is not None or plan_opts["gpu_memory"] is not None):
        _err("--world-size and --gpu-memory are planning options: add --plan (a run takes its world size "
             "from torchrun)")
    base = _PRETRAIN_BASE if mode == "pretrain" else None
    out = flags.get("output.dir")
    if resume and out and (Path(out).expanduser() / "config.yaml").is_file():
        base = _run(cfgmod.to_dict, _run(cfgmod.load_saved, Path(out).expanduser() / "config.yaml"))
    bs = flags.get("train.batch_size")
    if bs is not None and flags.get("train.micro_batch_size") is None:
        # a small --batch-size alone: shrink the default micro-batch to it (unless a recipe/--set chose one)
        recipe_mbs = (_run(cfgmod.read_yaml, config).get("train") or {}).get("micro_batch_size") if config else None
        if recipe_mbs is None and not any(o.startswith("train.micro_batch_size=") for o in overrides or []):
            flags["train.micro_batch_size"] = min(bs, cfgmod.TrainConfig().micro_batch_size)
    cfg = _run(cfgmod.resolve, config, flags, overrides, base, command=mode)  # --clip 0 = off: config's rule
    if quiet:
        _quiet_libraries()
    _cpu_dtype_note(cfg)

    from muonft_cli import train
    from muonft_cli.diagnose import auto as auto_mod
    from muonft_cli.render import NoticeSink, RichSink, optim_choice_lines

    cfg, choice = _run(auto_mod.resolve_config, cfg, mode)  # --optim auto: decided before the model loads
    if choice is not None and int(os.environ.get("RANK", "0")) == 0:
        for line in optim_choice_lines(choice):
            typer.echo(line, err=True)
    sink = NoticeSink() if quiet else RichSink()
    extra = {"optim_choice": choice} if choice is not None else {}
    summary = _run(train.run, cfg, mode, sink=sink, resume=resume, **extra)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        _json(summary)
    elif not quiet:
        val = f"  val loss {summary['val_loss']:.4f}  ppl {summary['val_ppl']:.2f}" \
            if summary.get("val_loss") is not None else ""
        typer.echo(f"{mode} done: {summary['steps']} steps, {summary['tokens']:,} tokens, train loss "
                   f"{summary['train_loss']:.4f}{val}\nfinal model: {summary['final']}")


def _split_targets(value: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


_O = typer.Option


def _flag(decls: str, help: str, default: Optional[bool] = None) -> Any:
    """A boolean option as a flag (no `<bool>` metavar). `--x/--no-x` flags default to None ("not given"), so a
    recipe's `true` stays unless `--no-x` is passed; their default is shown as off."""
    return _O(default, decls, help=help, metavar="", show_default="off" if "/" in decls else False)


def _fmt(value: Any) -> str:
    """A default as --help shows it: 1e-4 rather than 0.0001."""
    if isinstance(value, float) and value and abs(value) <= 1e-3:
        mantissa, exp = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exp)}"
    return repr(value) if isinstance(value, float) else str(value)


def _default(key: str, mode: str) -> str:
    """The default of config `key` (`section.name`) for `mode`, from the config dataclasses themselves (and
    pretrain's own base), so --help cannot drift from what runs."""
    from muonft_cli import config as cfgmod

    section, name = key.split(".")
    base = (_PRETRAIN_BASE if mode == "pretrain" else {}).get(section, {})
    return _fmt(base[name] if name in base else getattr(getattr(cfgmod.RunConfig(), section), name))


# Options shared by `pretrain` and `finetune` (declared once; `_train_options` adds them to both signatures,
# each with its own command's defaults in --help).
def _train_option_list(mode: str) -> list[tuple[str, Any, Any]]:
    def d(key: str) -> str:
        return _default(key, mode)

    return [
        ("data", Optional[str], _O(None, "--data", help="builtin:NAME, local file/folder, or hub dataset.")),
        ("out", Optional[str], _O(None, "--out", help="Run directory.")),
        ("optim", Optional[str], _O(None, "--optim", show_default=d("optimizer.name"),
                                    help="adamw | muon | muon-pe | adamuon | normuon | auto. The default, adamw, "
                                         "is the matched choice for Adam-pretrained bases (most public ones); see "
                                         "`muonft diagnose` for how a checkpoint was pretrained. auto (finetune): "
                                         "decide from that (full FT: the matched optimizer; LoRA: muon) and, "
                                         "without --lr, take the middle of diagnose's LR range.")),
        ("lr", Optional[float], _O(None, "--lr", show_default=d("optimizer.lr"),
                                   help="Peak learning rate.")),
        ("steps", Optional[int], _O(None, "--steps", show_default="one epoch",
                                    help="Optimizer steps (instead of --epochs).")),
        ("epochs", Optional[float], _O(None, "--epochs", show_default="1", help="Epochs (instead of --steps).")),
        ("batch_size", Optional[int], _O(None, "--batch-size", show_default=d("train.batch_size"),
                                         help="Global batch, in sequences.")),
        ("micro_batch_size", Optional[int], _O(None, "--micro-batch-size",
                                               show_default=f"{d('train.micro_batch_size')}, at most --batch-size",
                                               help="Sequences per forward pass (gradient accumulation).")),
        ("seq_len", Optional[int], _O(None, "--seq-len", show_default=d("data.seq_len"),
                                      help="Tokens per sequence (>= 2).")),
        ("val_fraction", Optional[float], _O(None, "--val-fraction", show_default=d("data.val_fraction"),
                                             help="Held-out fraction of documents.")),
        ("seed", Optional[int], _O(None, "--seed", show_default=d("train.seed"),
                                   help="Seed of the initialisation, data order and dropout, and of the "
                                        "validation hold-out (unless data.split_seed is set).")),
        ("warmup_ratio", Optional[float], _O(None, "--warmup-ratio", show_default=d("schedule.warmup_ratio"),
                                             help="Linear warmup, as a fraction of the steps.")),
        ("min_lr_ratio", Optional[float], _O(None, "--min-lr-ratio", show_default=d("schedule.min_lr_ratio"),
                                             help="Cosine floor as a fraction of --lr.")),
        ("weight_decay", Optional[float], _O(None, "--weight-decay", show_default=d("optimizer.weight_decay"),
                                             help="Decoupled weight decay (lr x wd x W each step), for every "
                                                  "optimizer.")),
        ("clip", Optional[float], _O(None, "--clip", show_default=d("train.clip"),
                                     help="Gradient-norm clip on raw gradients; 0 = off (so is "
                                          "--set train.clip=0 or null).")),
        ("eval_every", Optional[int], _O(None, "--eval-every", show_default=d("train.eval_every"),
                                         help="Validate every N steps (0 = only at the end).")),
        ("save_every", Optional[int], _O(None, "--save-every", show_default="auto",
                                         help="Checkpoint every N steps (0 = off). auto: every 10 % of the steps, "
                                              "and every train.save_every_minutes (10) minutes.")),
        ("keep_last", Optional[int], _O(None, "--keep-last", show_default=d("train.keep_last"),
                                        help="Checkpoints to keep.")),
        ("dtype", Optional[str], _O(None, "--dtype", show_default=d("model.dtype"),
                                    help="fp32 | bf16. bf16 is autocast on CUDA only; a CPU run computes in fp32.")),
        ("device", Optional[str], _O(None, "--device", show_default=d("train.device"),
                                     help="auto | cpu | cuda[:N] (auto: CUDA when present).")),
        ("strategy", Optional[str], _O(None, "--strategy", show_default=d("train.strategy"),
                                       help="Under torchrun: ddp (replicated) | fsdp (FSDP2, sharded weights, "
                                            "gradients, optimizer state and Muon). One process: unsharded.")),
        ("threads", Optional[int], _O(None, "--threads", show_default="torch's default",
                                      help="CPU threads for this run (torch.set_num_threads).")),
        ("report_to", Optional[list[str]], _O(None, "--report-to", show_default="none", metavar="BACKEND",
                                              help="Also log the step metrics to tensorboard (OUT/tb/) or wandb "
                                                   "(OUT/wandb/); repeatable; none = no backend.")),
        ("offline", Optional[bool], _flag("--offline/--no-offline", "Never contact the hub.")),
        ("trust_remote_code", Optional[bool], _flag(
            "--trust-remote-code/--no-trust-remote-code",
            "Run the modeling code a hub checkpoint ships (its .py files): only for models you trust.")),
        ("gradient_checkpointing", Optional[bool], _flag(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            "Recompute activations in the backward pass: less memory, slower steps.")),
        ("resume", bool, _flag("--resume", "Continue the run in --out from its last checkpoint.", False)),
        ("overwrite", Optional[bool], _flag("--overwrite/--no-overwrite", "Replace a run already in --out.")),
        ("config", Optional[str], _O(None, "--config", help="YAML recipe: a file or recipe:NAME (`muonft recipes`).")),
        ("set_", Optional[list[str]], _O(None, "--set", help="key.path=value override (repeatable).")),
        ("plan", bool, _flag("--plan", "Print the memory plan of this run per device (weights, gradients, "
                                       "optimizer state, activations; built from config.json alone, nothing "
                                       "written) and exit.", False)),
        ("world_size", Optional[int], _O(None, "--world-size", show_default="$WORLD_SIZE or 1",
                                         help="--plan: the number of devices (torchrun processes) to plan for.")),
        ("gpu_memory", Optional[str], _O(None, "--gpu-memory", show_default="the local GPU's, if any",
                                         help="--plan: memory of one GPU to fit into, e.g. 24GiB or 80GB.")),
        ("as_json", bool, _flag("--json", "Print one JSON summary line on stdout.", False)),
        ("quiet", bool, _flag("--quiet", "No progress bar (nor the libraries' bars and notices).", False)),
    ]


def _train_options(mode: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command `fn(own options..., **common)` the shared train options too, with `mode`'s defaults in
    --help (Typer reads `__signature__`)."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        import functools
        import inspect

        sig = inspect.signature(fn, eval_str=True)
        kw_only = inspect.Parameter.KEYWORD_ONLY
        own = [p.replace(kind=kw_only) for p in sig.parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(name, kw_only, default=opt, annotation=typ)
                 for name, typ, opt in _train_option_list(mode)]

        @functools.wraps(fn)
        def command(**kw: Any) -> None:
            fn(**kw)

        command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        return command

    return decorate


def _common_flags(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "model.name_or_path": kw.get("model"), "data.path": kw["data"], "output.dir": kw["out"],
        "optimizer.name": kw["optim"], "optimizer.lr": kw["lr"], "train.steps": kw["steps"],
        "train.epochs": kw["epochs"], "train.batch_size": kw["batch_size"],
        "train.micro_batch_size": kw["micro_batch_size"], "data.seq_len": kw["seq_len"],
        "data.val_fraction": kw["val_fraction"], "train.seed": kw["seed"],
        "schedule.warmup_ratio": kw["warmup_ratio"], "schedule.min_lr_ratio": kw["min_lr_ratio"],
        "optimizer.weight_decay": kw["weight_decay"], "train.clip": kw["clip"],
        "train.eval_every": kw["eval_every"], "train.save_every": kw["save_every"],
        "train.keep_last": kw["keep_last"], "output.overwrite": kw["overwrite"],
        "model.tokenizer": kw["tokenizer"], "model.dtype": kw["dtype"], "model.offline": kw["offline"],
        "model.trust_remote_code": kw["trust_remote_code"], "train.device": kw["device"],
        "train.threads": kw["threads"], "train.gradient_checkpointing": kw["gradient_checkpointing"],
        "train.report_to": kw["report_to"], "train.strategy": kw["strategy"],
    }


def _plan_opts(kw: dict[str, Any]) -> dict[str, Any]:
    return {"plan": kw["plan"], "world_size": kw["world_size"], "gpu_memory": kw["gpu_memory"]}


@app.command()
@_train_options("pretrain")
def pretrain(
    preset: Optional[str] = _O(None, "--preset", help="Model shape: tiny | small (Llama family, CPU-sized)."),
    model_config: Optional[str] = _O(None, "--model-config", help="A transformers config.json to build."),
    vocab_size: Optional[int] = _O(None, "--vocab-size", show_default=_default("model.vocab_size", "pretrain"),
                                   help="BPE vocabulary when training a tokenizer."),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Use this tokenizer instead of training a BPE."),
    **common: Any,
) -> None:
    """Pretrain a small model from scratch (tokenizer trained on the data unless --tokenizer)."""
    flags = _common_flags({"tokenizer": tokenizer, **common})
    flags.update({"model.preset": preset, "model.model_config": model_config, "model.vocab_size": vocab_size})
    _train_cmd("pretrain", flags, common["config"], common["set_"], common["resume"], common["as_json"],
               common["quiet"], _plan_opts(common))


@app.command()
@_train_options("finetune")
def finetune(
    model: Optional[str] = _O(None, "--model", help="Local HF dir, .gguf file, run's final/ dir, or hub id."),
    lora_rank: Optional[int] = _O(None, "--lora-rank", show_default="full fine-tuning",
                                  help="LoRA rank (absent = full fine-tuning)."),
    lora_alpha: Optional[float] = _O(None, "--lora-alpha", show_default="2 x rank", help="LoRA alpha."),
    lora_dropout: Optional[float] = _O(None, "--lora-dropout", show_default=_default("lora.dropout", "finetune"),
                                       help="Dropout on the LoRA branch's input, in [0, 1)."),
    lora_targets: Optional[str] = _O(None, "--lora-targets", show_default="every linear layer but embeddings/head",
                                     help="Comma-separated module names."),
    lora_variant: Optional[str] = _O(None, "--lora-variant", show_default=_default("lora.variant", "finetune"),
                                     help="lora | rslora | dora | pissa | olora."),
    merge: Optional[bool] = _flag("--merge/--no-merge", "Also write the merged model (LoRA runs)."),
    base_dtype: Optional[str] = _O(None, "--base-dtype", show_default="auto",
                                   help="auto | fp32 | bf16 | fp16: the dtype the frozen base of a LoRA run is "
                                        "loaded in (LoRA weights and optimizer state stay fp32). auto: bf16 on "
                                        "CUDA, fp32 on CPU. Full fine-tuning: fp32 only."),
    load_in_4bit: Optional[bool] = _flag("--load-in-4bit/--no-load-in-4bit",
                                         "QLoRA: the frozen base in 4-bit NF4 (CUDA and bitsandbytes: pip install "
                                         "'muonft\\[qlora]'); LoRA runs only."),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Tokenizer path (default: the model's)."),
    **common: Any,
) -> None:
    """Fine-tune a model (full, or LoRA with --lora-rank) with Adam or Muon."""
    flags = _common_flags({"model": model, "tokenizer": tokenizer, **common})
    flags.update({"lora.rank": lora_rank, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout,
                  "lora.targets": _split_targets(lora_targets), "lora.variant": lora_variant,
                  "lora.merge": merge, "model.base_dtype": base_dtype, "model.load_in_4bit": load_in_4bit})
    _train_cmd("finetune", flags, common["config"], common["set_"], common["resume"], common["as_json"],
               common["quiet"], _plan_opts(common))


# ------------------------------------------------------------------ sweep (engine: sweep/)


@app.command()
def sweep(
    recipe: Optional[str] = typer.Argument(None, help="Sweep recipe (a file or recipe:NAME): a run recipe plus a "
                                                   "sweep: section."),
    out: Optional[str] = _O(None, "--out", help="Sweep directory (run the same command again to resume)."),
    workers: Optional[int] = _O(None, "--workers", help="Cells run in parallel (CPU threads divided; one GPU each); "
                                                       "default 1, with --executor ray as many as the cluster fits.",
                                show_default=False),
    threads: Optional[int] = _O(None, "--threads", help="CPU threads per worker (default: cores / workers; with "
                                                       "--executor ray: 1, the num_cpus of each cell's task)."),
    executor: str = _O("local", "--executor", help="local: subprocesses on this machine; ray: each cell a Ray "
                                                  "task on a cluster (pip install 'muonft[ray]'; --out on a "
                                                  "filesystem every node shares)."),
    address: Optional[str] = _O(None, "--address", help="With --executor ray: the cluster (auto = the one `ray "
                                                       "start` runs here, HOST:PORT); default: start or attach a "
                                                       "local instance."),
    dry_run: bool = _flag("--dry-run", "Print the cells and exit.", False),
    keep_weights: bool = _flag("--keep-weights", "Keep checkpoints and non-best full-model weights.", False),
    retry_failed: bool = _flag("--retry-failed", "Run cells that failed in an earlier run again (default: leave "
                                                 "them failed).", False),
    set_: Optional[list[str]] = _O(None, "--set", help="key.path=value (run keys or sweep.*), repeatable."),
    report: Optional[str] = _O(None, "--report", help="Only re-aggregate and re-plot this sweep directory."),
    as_json: bool = _flag("--json", "Print the summary as one JSON line on stdout.", False),
) -> None:
    """Run a resumable LR x method x optimizer x rank x seed grid; write the paper's tables and figures."""

    from muonft_cli import render
    from muonft_cli import sweep as sw
    from muonft_cli.sweep import report as rep

    if report is None and recipe is None:
        _err("give a sweep recipe (e.g. recipe:mismatch-small; `muonft recipes` lists them) or --report DIR")
    if report is None and not dry_run and out is None:
        _err("--out is required: the sweep directory (run the same command again to resume)")
    plan = _run(sw.load_saved_plan, report) if report is not None else _run(sw.load_plan, recipe, set_ or [])
    if report is None:
        _run(sw.check_base_paths, plan)
    if dry_run:
        rows = sw.describe_cells(plan)
        for r in rows:
            if as_json:
                _json(r, status=False)
            else:
                typer.echo(f"{r['id']}  {r['hash']}")
        if not as_json:
            typer.echo(f"{len(rows)} cells, {len(plan.bases)} base model(s)", err=True)
        return
    if report is None:
        counts = _run(sw.run_sweep, plan, out, workers=workers, keep_weights=keep_weights,
                      retry_failed=retry_failed, threads=threads, executor=executor, address=address,
                      on_event=lambda rec: (line := render.sweep_event_line(rec)) and typer.echo(line, err=True))
        for line in render.sweep_outcome_lines(counts):
            typer.echo(line, err=True)
    summary = _run(rep.write_report, report or out, plan)
    if as_json:
        _json({k: summary[k] for k in ("table1", "gap_reduction", "counts", "warnings", "plots")})
    else:
        render.print_sweep_table(summary)
        typer.echo(f"summary: {report or out}/summary.md (.csv, .json); plots: "
                   f"{', '.join(summary['plots'].values()) or 'none yet'}")
    for line in render.sweep_warning_lines(summary):
        typer.echo(line, err=True)
    if report is None and (counts["failed"] or counts["failed_jobs"]):
        raise typer.Exit(1)  # the results so far are kept and reported; rerun to resume



# ------------------------------------------------------------------------------------------ plot (plot.py)


@app.command()
def plot(
    paths: list[str] = typer.Argument(..., metavar="PATH",
                                      help="Run directories (the --out of pretrain/finetune), or one sweep "
                                           "directory (the --out of `muonft sweep`)."),
    out: Optional[str] = _O(None, "--out", metavar="FILE | DIR",
                            show_default="RUN/curves.png for one run; the sweep directory",
                            help="Runs: the image to write (.png, .pdf, .svg). A sweep: the folder for its "
                                 "figures."),
    metric: Optional[list[str]] = _O(None, "--metric", metavar="METRIC", show_default="loss and val_loss",
                                     help="A panel per metric (repeatable): loss | val_loss | val_ppl | lr | "
                                          "grad_norm | tokens_per_s."),
    as_json: bool = _flag("--json", "Print what was written as one JSON document on stdout.", False),
) -> None:
    """Draw the training and validation curves of runs on shared axes, or redraw a sweep's figures."""
    from muonft_cli import plot as plot_mod

    result = _run(plot_mod.plot, paths, out, metric)
    if as_json:
        _json(result)
    else:
        for path in result["paths"]:
            typer.echo(path)


# ------------------------------------------------------------------------------------ eval (evaluate.py)


@app.command("eval")
def eval_(
    model: str = _O(..., "--model", help="Model folder, adapter folder, .gguf file or hub id to evaluate."),
    data: Optional[str] = _O(None, "--data", help="Perplexity on this dataset's validation split."),
    base: Optional[str] = _O(None, "--base", help="Base model: comparisons, weight distance (and an adapter's base)."),
    reference_data: Optional[str] = _O(None, "--reference-data", help="Forgetting: ppl of model and base here."),
    seq_len: Optional[int] = _O(None, "--seq-len", show_default=_default("data.seq_len", "eval"),
                                help="Tokens per packed sequence (>= 2)."),
    batch_size: Optional[int] = _O(None, "--batch-size", show_default=_default("eval.batch_size", "eval"),
                                   help="Sequences per forward pass."),
    max_batches: Optional[int] = _O(None, "--max-batches", show_default="all",
                                    help="Evaluate only this many batches per set."),
    val_fraction: Optional[float] = _O(None, "--val-fraction", show_default=_default("data.val_fraction", "eval"),
                                       help="Hold-out fraction (as in training)."),
    seed: Optional[int] = _O(None, "--seed", show_default=_default("train.seed", "eval"),
                             help="Hold-out seed (as in training)."),
    split: str = _O("val", "--split", help="val | train"),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Tokenizer path (default: the model's)."),
    device: Optional[str] = _O(None, "--device", show_default=_default("train.device", "eval"),
                               help="auto | cpu | cuda[:N]"),
    offline: Optional[bool] = _flag("--offline/--no-offline", "Never contact the hub (sets HF_HUB_OFFLINE=1)."),
    trust_remote_code: Optional[bool] = _flag(
        "--trust-remote-code/--no-trust-remote-code",
        "Run the modeling code a hub checkpoint ships (its .py files): only for models you trust."),
    config: Optional[str] = _O(None, "--config", help="YAML recipe."),
    set_: Optional[list[str]] = _O(None, "--set", help="key.path=value override (repeatable)."),
    model_only: bool = _flag("--model-only", "The model alone: skip every base comparison (an adapter's base "
                             "included).", False),
    tasks: Optional[list[str]] = _O(None, "--tasks", metavar="TASK[,TASK]",
                                    help="lm-evaluation-harness tasks (repeatable; needs the lm-eval extra); an "
                                    "adapter is merged for them."),
    num_fewshot: Optional[int] = _O(None, "--num-fewshot", show_default="the task's",
                                    help="Few-shot examples per --tasks prompt."),
    limit: Optional[float] = _O(None, "--limit", show_default="all",
                                help="Examples per --tasks task (N, or a fraction below 1)."),
    include_path: Optional[list[str]] = _O(None, "--include-path", metavar="DIR",
                                           help="Folder of your own lm-eval task YAMLs (repeatable)."),
    bootstrap_iters: Optional[int] = _O(None, "--bootstrap-iters", show_default="100000",
                                        help="lm-eval resamples for stderrs without a closed form (0: none)."),
    as_json: bool = _flag("--json", "Print the report as one JSON document on stdout.", False),
) -> None:
    """Perplexity, forgetting, weight distance from the base, LoRA spectra and lm-eval tasks of a model or adapter."""
    from muonft_cli import config as cfgmod
    from muonft_cli import lm_eval_bridge

    flags = {"model.name_or_path": model, "data.path": data, "eval.reference_data": reference_data,
             "data.seq_len": seq_len, "eval.batch_size": batch_size, "eval.max_batches": max_batches,
             "data.val_fraction": val_fraction, "train.seed": seed, "model.tokenizer": tokenizer,
             "train.device": device, "model.offline": offline, "model.trust_remote_code": trust_remote_code}
    cfg = _run(cfgmod.resolve, config, flags, set_ or [])
    # --tasks checked (and lm-eval's task index read) before any model loads
    plan = _run(lm_eval_bridge.prepare, tasks, num_fewshot, limit, include_path, bootstrap_iters)
    _cpu_dtype_note(cfg)

    from transformers.utils import logging as hf_logging

    from muonft_cli import evaluate

    hf_logging.disable_progress_bar()
    report = _run(evaluate.run_eval, cfg, base=base, split=split, compare=not model_only, tasks=plan)
    if as_json:
        _json(report)
    else:
        from muonft_cli import render

        render.print_eval(report)


# ------------------------------------------------------------------------------ diagnose (diagnose/)


@app.command()
def diagnose(
    path: str = typer.Argument(..., help="HF model dir, .safetensors, .gguf, or LoRA adapter dir."),
    base: Optional[str] = _O(None, "--base", help="For an adapter: its base model (adds merged-weight spectra)."),
    exact: bool = _flag("--exact", "Exact fp64 spectra for every matrix.", False),
    fast: bool = _flag("--fast", "Lanczos estimates (with error bounds) for every large matrix.", False),
    target_optim: str = _O("muon", "--target-optim", help="Optimizer you will fine-tune with."),
    data: str = _O("builtin:kjv", "--data", help="Dataset for the recommended finetune command."),
    per_matrix: bool = _flag("--per-matrix", "Also list every matrix.", False),
    workers: Optional[int] = _O(None, "--workers", show_default="chosen from the cores",
                                help="Matrices analysed concurrently."),
    sample_experts: int = _O(4, "--sample-experts",
                             help="MoE: routed experts analysed per layer (evenly spaced; shared experts always); "
                                  "0 = all."),
    device: str = _O("auto", "--device", help="Where matrices are analysed: auto (CUDA if available), cpu, cuda."),
    as_json: bool = _flag("--json", "One JSON document on stdout, nothing else.", False),
    quiet: bool = _flag("--quiet", "No progress bar (nor the libraries' bars and notices).", False),
) -> None:
    """Guess how a checkpoint was pretrained (Adam or Muon) from its spectra, and recommend how to fine-tune."""
    if exact and fast:
        _err("--exact and --fast exclude each other; pass one (default: chosen per matrix by size)")
    from muonft_cli import diagnose as diag
    from muonft_cli.render import DiagnoseProgressBar, render_diagnose

    mode = "exact" if exact else "fast" if fast else "auto"
    if quiet:
        _quiet_libraries()
    bar = None if quiet else DiagnoseProgressBar()
    try:
        report = _run(diag.diagnose, path, base=base, mode=mode, target_optim=target_optim, data=data,
                      per_matrix=per_matrix, workers=workers, progress=bar, on_open=bar.start if bar else None,
                      sample_experts=sample_experts, device=device)
    finally:
        if bar:
            bar.stop()
    if as_json:
        _json(report)
    else:
        render_diagnose(report)



# ------------------------------------------------------------------------------- recipes (recipes/)

recipes_app = typer.Typer(
    help="List, show and copy the recipes shipped with muonft (use one anywhere as recipe:NAME).",
    invoke_without_command=True, no_args_is_help=False,
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(
    ctx: typer.Context,
    as_json: bool = _flag("--json", "Print the list as one JSON document on stdout.", False),
) -> None:
    """List the shipped recipes, one line each (`muonft recipes show NAME`, `muonft recipes copy NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from muonft_cli import recipes as rc

    rows = _run(rc.list_recipes)
    if as_json:
        _json(rows, status=False)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['description']}")
    typer.echo("use one as --config recipe:NAME or `muonft sweep recipe:NAME`; `muonft recipes copy NAME` "
               "writes it out for editing", err=True)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name (with or without .yaml).")) -> None:
    """Print a shipped recipe's YAML."""
    from muonft_cli import recipes as rc

    typer.echo(_run(rc.read_text, name), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="Recipe name (with or without .yaml)."),
    dest: Optional[str] = typer.Argument(None, help="File or existing folder to write (default ./NAME.yaml)."),
    force: bool = _flag("--force", "Overwrite an existing file.", False),
) -> None:
    """Write a shipped recipe to a file, to edit and pass as --config FILE."""
    from muonft_cli import recipes as rc

    out = _run(rc.copy, name, dest, force=force)
    typer.echo(f"wrote {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
