"""The `muonft` command line: Typer only. Each command parses, builds a config, calls the engine, prints.

torch / transformers are imported inside the commands (through the engine modules), so `muonft --help`
and `muonft --version` stay instant. Domain errors from the engine (`muonft_cli.errors`) become one line
on stderr and an exit code (2: bad input, 1: failure during work) here, and only here.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import typer

from muonft_cli import __version__
from muonft_cli.errors import MuonftError

app = typer.Typer(
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


# ------------------------------------------------------------ pretrain / finetune (engine: muonft_cli.train)

_PRETRAIN_BASE = {"optimizer": {"lr": 1e-3}}


def _train_cmd(mode: str, flags: dict[str, Any], config: Optional[str], overrides: Optional[list[str]],
               resume: bool, as_json: bool, quiet: bool) -> None:
    """Shared body of `pretrain` / `finetune`: flags -> config -> train.run -> print."""
    import json
    import os
    from pathlib import Path

    from muonft_cli import config as cfgmod

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
    if flags.get("train.clip") == 0:
        flags["train.clip"] = None
        overrides = list(overrides or []) + ["train.clip=null"]
    cfg = _run(cfgmod.resolve, config, flags, overrides, base)

    from muonft_cli import train
    from muonft_cli.render import RichSink
    from muonft_cli.train.sink import NullSink

    sink = NullSink() if quiet else RichSink()
    summary = _run(train.run, cfg, mode, sink=sink, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        val = f"  val loss {summary['val_loss']:.4f}  ppl {summary['val_ppl']:.2f}" \
            if summary.get("val_loss") is not None else ""
        typer.echo(f"{mode} done: {summary['steps']} steps, {summary['tokens']:,} tokens, train loss "
                   f"{summary['train_loss']:.4f}{val}\nfinal model: {summary['final']}")


def _split_targets(value: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


_O = typer.Option


# Options shared by `pretrain` and `finetune` (declared once; `_train_options` adds them to both signatures).
_TRAIN_OPTIONS: list[tuple[str, Any, Any]] = [
    ("data", Optional[str], _O(None, "--data", help="builtin:NAME, local file/folder, or hub dataset.")),
    ("out", Optional[str], _O(None, "--out", help="Run directory.")),
    ("optim", Optional[str], _O(None, "--optim", help="adamw | muon | muon-pe | adamuon | normuon.")),
    ("lr", Optional[float], _O(None, "--lr", help="Peak learning rate (pretrain's default 1e-3).")),
    ("steps", Optional[int], _O(None, "--steps", help="Optimizer steps.")),
    ("epochs", Optional[float], _O(None, "--epochs", help="Epochs (instead of --steps; default 1).")),
    ("batch_size", Optional[int], _O(None, "--batch-size", help="Global batch, in sequences.")),
    ("micro_batch_size", Optional[int], _O(None, "--micro-batch-size", help="Sequences per forward pass.")),
    ("seq_len", Optional[int], _O(None, "--seq-len", help="Tokens per sequence.")),
    ("val_fraction", Optional[float], _O(None, "--val-fraction", help="Held-out fraction of documents.")),
    ("seed", Optional[int], _O(None, "--seed")),
    ("warmup_ratio", Optional[float], _O(None, "--warmup-ratio", help="Linear warmup fraction (default 0.03).")),
    ("min_lr_ratio", Optional[float], _O(None, "--min-lr-ratio", help="Cosine floor as a fraction of --lr.")),
    ("weight_decay", Optional[float], _O(None, "--weight-decay")),
    ("clip", Optional[float], _O(None, "--clip", help="Gradient-norm clip on raw gradients; 0 = off.")),
    ("eval_every", Optional[int], _O(None, "--eval-every", help="Validate every N steps (0 = only at the end).")),
    ("save_every", Optional[int], _O(None, "--save-every", help="Checkpoint every N steps (0 = off).")),
    ("keep_last", Optional[int], _O(None, "--keep-last", help="Checkpoints to keep.")),
    ("dtype", Optional[str], _O(None, "--dtype", help="fp32 | bf16 (bf16 autocast on GPU).")),
    ("offline", bool, _O(False, "--offline", help="Never contact the hub.")),
    ("trust_remote_code", bool, _O(False, "--trust-remote-code")),
    ("gradient_checkpointing", bool, _O(False, "--gradient-checkpointing")),
    ("resume", bool, _O(False, "--resume", help="Continue the run in --out from its last checkpoint.")),
    ("overwrite", bool, _O(False, "--overwrite", help="Replace a run already in --out.")),
    ("config", Optional[str], _O(None, "--config", help="YAML recipe: a file or recipe:NAME (`muonft recipes`).")),
    ("set_", Optional[list[str]], _O(None, "--set", help="key.path=value override (repeatable).")),
    ("as_json", bool, _O(False, "--json", help="Print one JSON summary line on stdout.")),
    ("quiet", bool, _O(False, "--quiet", help="No progress bar.")),
]


def _train_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command `fn(own options..., **common)` the `_TRAIN_OPTIONS` too (Typer reads `__signature__`)."""
    import functools
    import inspect

    sig = inspect.signature(fn, eval_str=True)
    kw_only = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=kw_only) for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, kw_only, default=opt, annotation=typ) for name, typ, opt in _TRAIN_OPTIONS]

    @functools.wraps(fn)
    def command(**kw: Any) -> None:
        fn(**kw)

    command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return command


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
        "train.keep_last": kw["keep_last"], "output.overwrite": kw["overwrite"] or None,
        "model.tokenizer": kw["tokenizer"], "model.dtype": kw["dtype"], "model.offline": kw["offline"] or None,
        "model.trust_remote_code": kw["trust_remote_code"] or None,
        "train.gradient_checkpointing": kw["gradient_checkpointing"] or None,
    }


@app.command()
@_train_options
def pretrain(
    preset: Optional[str] = _O(None, "--preset", help="Model shape: tiny | small (Llama family, CPU-sized)."),
    model_config: Optional[str] = _O(None, "--model-config", help="A transformers config.json to build."),
    vocab_size: Optional[int] = _O(None, "--vocab-size", help="BPE vocabulary when training a tokenizer."),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Use this tokenizer instead of training a BPE."),
    **common: Any,
) -> None:
    """Pretrain a small model from scratch (tokenizer trained on the data unless --tokenizer)."""
    flags = _common_flags({"tokenizer": tokenizer, **common})
    flags.update({"model.preset": preset, "model.model_config": model_config, "model.vocab_size": vocab_size})
    _train_cmd("pretrain", flags, common["config"], common["set_"], common["resume"], common["as_json"],
               common["quiet"])


@app.command()
@_train_options
def finetune(
    model: Optional[str] = _O(None, "--model", help="Local HF dir, .gguf file, run's final/ dir, or hub id."),
    lora_rank: Optional[int] = _O(None, "--lora-rank", help="LoRA rank (absent = full fine-tuning)."),
    lora_alpha: Optional[float] = _O(None, "--lora-alpha", help="LoRA alpha (default 2 x rank)."),
    lora_dropout: Optional[float] = _O(None, "--lora-dropout"),
    lora_targets: Optional[str] = _O(None, "--lora-targets", help="Comma-separated module names."),
    lora_variant: Optional[str] = _O(None, "--lora-variant", help="lora | rslora | dora | pissa | olora."),
    merge: bool = _O(False, "--merge", help="Also write the merged model."),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Tokenizer path (default: the model's)."),
    **common: Any,
) -> None:
    """Fine-tune a model (full, or LoRA with --lora-rank) with Adam or Muon."""
    flags = _common_flags({"model": model, "tokenizer": tokenizer, **common})
    flags.update({"lora.rank": lora_rank, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout,
                  "lora.targets": _split_targets(lora_targets), "lora.variant": lora_variant,
                  "lora.merge": merge or None})
    _train_cmd("finetune", flags, common["config"], common["set_"], common["resume"], common["as_json"],
               common["quiet"])


# ------------------------------------------------------------------ sweep (engine: sweep/)


@app.command()
def sweep(
    recipe: Optional[str] = typer.Argument(None, help="Sweep recipe (a file or recipe:NAME): a run recipe plus a "
                                                   "sweep: section."),
    out: Optional[str] = _O(None, "--out", help="Sweep directory (run the same command again to resume)."),
    workers: int = _O(1, "--workers", help="Cells run in parallel (CPU threads divided; one GPU each)."),
    threads: Optional[int] = _O(None, "--threads", help="CPU threads per worker (default: cores / workers)."),
    dry_run: bool = _O(False, "--dry-run", help="Print the cells and exit."),
    keep_weights: bool = _O(False, "--keep-weights", help="Keep checkpoints and non-best full-model weights."),
    retry_failed: bool = _O(False, "--retry-failed", help="Run cells that failed in an earlier run again "
                                                         "(default: leave them failed)."),
    set_: Optional[list[str]] = _O(None, "--set", help="key.path=value (run keys or sweep.*), repeatable."),
    report: Optional[str] = _O(None, "--report", help="Only re-aggregate and re-plot this sweep directory."),
    as_json: bool = _O(False, "--json", help="Print the summary as one JSON line on stdout."),
) -> None:
    """Run a resumable LR x method x optimizer x rank x seed grid; write the paper's tables and figures."""
    import json

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
            typer.echo(json.dumps(r) if as_json else f"{r['id']}  {r['hash']}")
        if not as_json:
            typer.echo(f"{len(rows)} cells, {len(plan.bases)} base model(s)", err=True)
        return
    if report is None:
        counts = _run(sw.run_sweep, plan, out, workers=workers, keep_weights=keep_weights,
                      retry_failed=retry_failed, threads=threads,
                      on_event=lambda rec: (line := render.sweep_event_line(rec)) and typer.echo(line, err=True))
        for line in render.sweep_outcome_lines(counts):
            typer.echo(line, err=True)
    summary = _run(rep.write_report, report or out, plan)
    if as_json:
        typer.echo(json.dumps({k: summary[k] for k in ("table1", "gap_reduction", "counts", "warnings", "plots")},
                              default=str))
    else:
        render.print_sweep_table(summary)
        typer.echo(f"summary: {report or out}/summary.md (.csv, .json); plots: "
                   f"{', '.join(summary['plots'].values()) or 'none yet'}")
    for line in render.sweep_warning_lines(summary):
        typer.echo(line, err=True)
    if report is None and (counts["failed"] or counts["failed_jobs"]):
        raise typer.Exit(1)  # the results so far are kept and reported; rerun to resume



# ------------------------------------------------------------------------------------ eval (evaluate.py)


@app.command("eval")
def eval_(
    model: str = _O(..., "--model", help="Model folder, adapter folder, .gguf file or hub id to evaluate."),
    data: Optional[str] = _O(None, "--data", help="Perplexity on this dataset's validation split."),
    base: Optional[str] = _O(None, "--base", help="Base model: comparisons, weight distance (and an adapter's base)."),
    reference_data: Optional[str] = _O(None, "--reference-data", help="Forgetting: ppl of model and base here."),
    seq_len: Optional[int] = _O(None, "--seq-len", help="Tokens per packed sequence."),
    batch_size: Optional[int] = _O(None, "--batch-size", help="Sequences per forward pass."),
    max_batches: Optional[int] = _O(None, "--max-batches", help="Evaluate only this many batches per set."),
    val_fraction: Optional[float] = _O(None, "--val-fraction", help="Hold-out fraction (as in training)."),
    seed: Optional[int] = _O(None, "--seed", help="Hold-out seed (as in training)."),
    split: str = _O("val", "--split", help="val | train"),
    tokenizer: Optional[str] = _O(None, "--tokenizer", help="Tokenizer path (default: the model's)."),
    device: Optional[str] = _O(None, "--device", help="auto | cpu | cuda[:N]"),
    offline: bool = _O(False, "--offline", help="Never contact the hub (sets HF_HUB_OFFLINE=1)."),
    trust_remote_code: bool = _O(False, "--trust-remote-code", help="Allow model code from the checkpoint."),
    config: Optional[str] = _O(None, "--config", help="YAML recipe."),
    set_: Optional[list[str]] = _O(None, "--set", help="key.path=value override (repeatable)."),
    model_only: bool = _O(False, "--model-only", help="The model alone: skip every base comparison (an "
                          "adapter's base included)."),
    as_json: bool = _O(False, "--json", help="Print the report as one JSON document on stdout."),
) -> None:
    """Perplexity, forgetting, weight distance from the base and LoRA spectra of a model or adapter."""
    import json

    from muonft_cli import config as cfgmod

    flags = {"model.name_or_path": model, "data.path": data, "eval.reference_data": reference_data,
             "data.seq_len": seq_len, "eval.batch_size": batch_size, "eval.max_batches": max_batches,
             "data.val_fraction": val_fraction, "train.seed": seed, "model.tokenizer": tokenizer,
             "train.device": device, "model.offline": offline or None,
             "model.trust_remote_code": trust_remote_code or None}
    cfg = _run(cfgmod.resolve, config, flags, set_ or [])

    from transformers.utils import logging as hf_logging

    from muonft_cli import evaluate

    hf_logging.disable_progress_bar()
    report = _run(evaluate.run_eval, cfg, base=base, split=split, compare=not model_only)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        from muonft_cli import render

        render.print_eval(report)


# ------------------------------------------------------------------------------ diagnose (diagnose/)


@app.command()
def diagnose(
    path: str = typer.Argument(..., help="HF model dir, .safetensors, .gguf, or LoRA adapter dir."),
    base: Optional[str] = _O(None, "--base", help="For an adapter: its base model (adds merged-weight spectra)."),
    exact: bool = _O(False, "--exact", help="Exact fp64 spectra for every matrix."),
    fast: bool = _O(False, "--fast", help="Lanczos estimates (with error bounds) for every large matrix."),
    target_optim: str = _O("muon", "--target-optim", help="Optimizer you will fine-tune with."),
    data: str = _O("builtin:kjv", "--data", help="Dataset for the recommended finetune command."),
    per_matrix: bool = _O(False, "--per-matrix", help="Also list every matrix."),
    workers: Optional[int] = _O(None, "--workers", help="Matrices analysed concurrently."),
    as_json: bool = _O(False, "--json", help="One JSON document on stdout, nothing else."),
    quiet: bool = _O(False, "--quiet", help="No progress bar."),
) -> None:
    """Guess how a checkpoint was pretrained (Adam or Muon) from its spectra, and recommend how to fine-tune."""
    import json

    if exact and fast:
        _err("--exact and --fast exclude each other; pass one (default: chosen per matrix by size)")
    from muonft_cli import diagnose as diag
    from muonft_cli.render import DiagnoseProgressBar, render_diagnose

    mode = "exact" if exact else "fast" if fast else "auto"
    bar = None if quiet else DiagnoseProgressBar()
    try:
        report = _run(diag.diagnose, path, base=base, mode=mode, target_optim=target_optim, data=data,
                      per_matrix=per_matrix, workers=workers, progress=bar, on_open=bar.start if bar else None)
    finally:
        if bar:
            bar.stop()
    if as_json:
        typer.echo(json.dumps(report))
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
    as_json: bool = _O(False, "--json", help="Print the list as one JSON document on stdout."),
) -> None:
    """List the shipped recipes, one line each (`muonft recipes show NAME`, `muonft recipes copy NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from muonft_cli import recipes as rc

    rows = _run(rc.list_recipes)
    if as_json:
        typer.echo(json.dumps(rows))
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
    force: bool = _O(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a shipped recipe to a file, to edit and pass as --config FILE."""
    from muonft_cli import recipes as rc

    out = _run(rc.copy, name, dest, force=force)
    typer.echo(f"wrote {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
