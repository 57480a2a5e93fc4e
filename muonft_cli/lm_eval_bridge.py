"""The lm-evaluation-harness bridge: `muonft eval --tasks` (the optional extra `muonft[lm-eval]`).

Owns
- `prepare`: everything checked before a model is loaded: the extra is installed, `--num-fewshot` / `--limit` are
  in range, `--include-path` folders exist, and every `--tasks` name is one lm-eval's `TaskManager` knows (its
  bundled task YAMLs, offline, plus the YAMLs under `--include-path`); a problem is one `UserInputError` line
  (exit 2), an unknown task with the closest known names.
- `run_tasks`: `lm_eval.simple_evaluate` on an `HFLM` wrapped around the model and tokenizer `muonft eval` has
  already loaded (an adapter is merged by the caller first), and the results turned into
  `{task: {metric: value}}` — `acc`, `acc_stderr`, ... for lm-eval's default filter ("none"), `metric,filter`
  for the others (`exact_match,strict-match`); a stderr lm-eval reports as "N/A" becomes None.

Hub tasks download their data sets through `datasets` (so they need the network, or a warm cache with the
offline flags); a task YAML over local files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) runs
offline.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from muonft_cli._common import first_line
from muonft_cli.errors import UserInputError

INSTALL = "pip install 'muonft[lm-eval]'"
BOOTSTRAP_ITERS = 100000  # lm-eval's default: resamples for the stderr of metrics without a closed form


@dataclass
class TaskPlan:
    """What `prepare` checked and `run_tasks` runs."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | float | None = None
    include_path: list[str] = field(default_factory=list)
    bootstrap_iters: int = BOOTSTRAP_ITERS
    manager: Any = None  # lm_eval.tasks.TaskManager (indexed once)


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """`--tasks a,b --tasks c` → ["a", "b", "c"] (blanks dropped, order kept, duplicates once)."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for name in part.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def require() -> None:
    """The extra is installed, or one line saying how to install it."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserInputError(f"--tasks needs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL}")


def _close_names(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close:  # a prefix or substring (`arc` → arc_easy, arc_challenge)
        close = [k for k in known if k.startswith(name) or name in k][:5]
    return f"close names: {', '.join(close)}" if close else "no close name"


def _local_manager(names: list[str], include: list[str]) -> Any:
    """A `TaskManager` over the `--include-path` folders alone, when every name is a plain task there (a task
    YAML is self-contained; a group or tag may name bundled tasks), else None."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=include, include_defaults=False)
    index = manager.task_index
    if all(n in index and index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names):
        return manager
    return None


def prepare(tasks: str | list[str] | None, num_fewshot: int | None = None, limit: float | None = None,
            include_path: list[str] | None = None, bootstrap_iters: int | None = None) -> TaskPlan | None:
    """Check the `--tasks` flags before any model is loaded; None when no task was asked for.

    Raises `UserInputError` (exit 2) for a missing extra, `--num-fewshot` < 0, `--limit` <= 0,
    `--bootstrap-iters` < 0, a missing `--include-path` folder or an unknown task name (with close names from
    lm-eval's task index)."""
    names = parse_tasks(tasks)
    include = [str(p) for p in (include_path or [])]
    if not names:
        if num_fewshot is not None or limit is not None or include or bootstrap_iters is not None:
            raise UserInputError("--num-fewshot / --limit / --include-path / --bootstrap-iters go with --tasks: "
                                 "pass --tasks NAME[,NAME]")
        return None
    if bootstrap_iters is not None and bootstrap_iters < 0:
        raise UserInputError(f"--bootstrap-iters {bootstrap_iters}: use 0 (no bootstrapped stderr) or more")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserInputError(f"--num-fewshot {num_fewshot}: use 0 or more")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise UserInputError(f"--limit {limit}: use a number of examples per task (>= 1) or a fraction in (0, 1)")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise UserInputError(f"--limit {limit}: a count of examples must be whole (or a fraction below 1)")
        limit = int(limit)
    for p in include:
        if not os.path.isdir(p):
            raise UserInputError(f"--include-path '{p}' is not a folder: pass a folder of lm-eval task YAML files")
    require()
    from lm_eval.tasks import TaskManager

    manager = _local_manager(names, include) if include else None
    if manager is None:  # the bundled index too (~10 s: lm-eval parses its thousands of task YAMLs)
        manager = TaskManager(include_path=include or None)
    known = manager.all_tasks
    known_set = set(known)
    for name in names:
        if name not in known_set and not name.endswith((".yaml", ".yml")):
            raise UserInputError(f"unknown lm-eval task '{name}' ({_close_names(name, known)}): see "
                                 "`lm-eval ls tasks`, or pass --include-path DIR for your own task YAMLs")
        if name.endswith((".yaml", ".yml")) and not os.path.isfile(name):
            raise UserInputError(f"task file '{name}' does not exist: pass a task name or an existing task YAML")
    return TaskPlan(tasks=names, num_fewshot=num_fewshot, limit=limit, include_path=include, manager=manager,
                    bootstrap_iters=BOOTSTRAP_ITERS if bootstrap_iters is None else bootstrap_iters)


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    try:  # numpy scalars
        return float(v)
    except (TypeError, ValueError):
        return None  # "N/A" (a stderr lm-eval could not compute)


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, float | int | None]]:
    """lm-eval's `results["results"]` → {task: {metric: value}}; the default filter's ",none" suffix dropped."""
    out: dict[str, dict[str, Any]] = {}
    for task, row in (results.get("results") or {}).items():
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            if key in ("alias", "name", "sample_len"):  # labels and a count, not metrics (`samples` has it)
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = _number(value)
        out[task] = metrics
    return out


def run_tasks(model: Any, tokenizer: Any, plan: TaskPlan, batch_size: int = 1,
              autocast_dtype: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `plan`'s tasks on a loaded (merged, not a peft) causal LM through `lm_eval.simple_evaluate`.

    Args:
        model: a transformers causal LM (its device is where lm-eval runs).
        tokenizer: its tokenizer.
        plan: from `prepare`.
        batch_size: requests per forward pass (`--batch-size`).
        autocast_dtype: e.g. `torch.bfloat16`: lm-eval's `mixed_precision_dtype` (the forward pass under autocast).

    Returns:
        (tasks, info): tasks = {task: {metric: value}}; info = lm-eval's version, num_fewshot and limit asked for,
        the shots each task used (`n_shot`), the examples each task scored (`samples`), the include path.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warnings that an already-loaded model is passed: that is the point here
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  mixed_precision_dtype=autocast_dtype)
    finally:
        hf_log.setLevel(level)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress ("bootstrapping ...") on stdout
            results = lm_eval.simple_evaluate(model=lm, tasks=list(plan.tasks), num_fewshot=plan.num_fewshot,
                                              limit=plan.limit, bootstrap_iters=plan.bootstrap_iters,
                                              task_manager=plan.manager, log_samples=False)
    except OSError as e:  # a task's data set: the hub unreachable / offline (ConnectionError), a missing file
        raise UserInputError(f"lm-eval could not load the data of --tasks {','.join(plan.tasks)}: {first_line(e)} "
                             "(hub tasks download their data set: connect, or fill the datasets cache first; "
                             "a local task YAML: check its dataset_path / data_files)") from e
    results = results or {}
    samples = {t: (n.get("effective") if isinstance(n, dict) else n)
               for t, n in (results.get("n-samples") or {}).items()}
    info = {"version": lm_eval.__version__, "num_fewshot": plan.num_fewshot, "limit": plan.limit,
            "bootstrap_iters": plan.bootstrap_iters,
            "include_path": plan.include_path or None, "n_shot": dict(results.get("n-shot") or {}),
            "samples": samples}
    return metrics_of(results), info
