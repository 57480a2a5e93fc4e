"""`muonft sweep`: resumable learning-rate × method × optimizer × rank × seed grids.

The package re-exports the API its callers use. Its modules, each owning one part:
- `plan`: the recipe (a run recipe plus a `sweep:` section, whose schema is `muonft_cli.config.SweepSection`)
  validated and deterministically expanded into bases and cells with config hashes;
- `index`: the append-only `sweep.jsonl` index;
- `jobs`: what each subprocess runs (pretrain a base, evaluate it, fine-tune a cell, a forgetting eval);
- `scheduler`: process control (spawning on worker slots, waiting, signals, locks);
- `ray_executor`: `--executor ray`, each job a Ray task on a cluster (imported only then: Ray is an extra);
- `policy`: the decisions (best LRs, weight pruning, which forgetting evaluations to queue);
- `report` (aggregation, Markdown/CSV) and `plots` (the figures). The console lines and the terminal table
  are in the sweep section of `muonft_cli.render`.

The paper's whole method ("Can Muon Fine-tune Adam-Pretrained Models?", Qu et al. 2026, §3 Table 1 / Fig. 4,
§4.4 Fig. 5) is "best validation perplexity over a learning-rate sweep, averaged over 3 seeds", per
(pretrained model, full/LoRA, optimizer[, rank]); a sweep runs exactly that grid.

Sweep recipe (every key below `sweep:` is checked strictly; the other sections are the run recipe that every
cell starts from, see `muonft_cli.config`):

```yaml
data: {path: builtin:kjv, seq_len: 128}
train: {steps: 300, eval_every: 50}
sweep:
  bases:                       # name -> a local model (path) or a pretrain run recipe, run first and cached
    adam: {pretrain: {model: {preset: tiny}, data: {path: builtin:shakespeare}, optimizer: {name: adamw}}}
    llama: {path: meta-llama/Llama-2-7b-hf, pretrained_with: adamw}
  methods: [full, lora]
  optims: [adamw, muon]
  lr: {full: {adamw: [1e-4, 3e-4]}, lora: {adamw: [1e-3], muon: [1e-3]}}   # per method x optim
  lora_ranks: [8]
  alpha_equals_2r: true        # lora.alpha = 2 * rank (paper); false keeps the recipe's lora.alpha
  seeds: [0, 1, 2]
  axes: {schedule.warmup_ratio: [0.0, 0.03]}   # any other config key as an extra axis
  metric: final                # final | best: which validation PPL of a run counts
  reference_data: builtin:shakespeare          # forgetting (default: the recipe's eval.reference_data)
  variants:                    # extra cells: the grid cells matching `where`, again, with the overrides `set`
    - {name: anchor1, where: {methods: [full], matched: false}, set: {optimizer.anchor_decay: 1.0}, lr: [3e-3]}
```

A variant's cells carry the axis `("variant", name)` (ids end in `-variant=NAME`); the grid's own cells, ids
and hashes are those of the recipe without `variants:`. `where` selects by `methods`, `optims`, `bases` and
`matched` (the optimizer's family against the base's pretraining one); `lr` replaces the cell's LR grid.

Index and resumption: `sweep.jsonl` holds one JSON record per event (append-only, one `write` per line, fsync'd;
a torn last line after SIGKILL is ignored), the latest record of an id wins. A restart skips `done` cells whose
config hash matches, resumes interrupted ones (`--resume` when the run has a checkpoint, else `--overwrite`),
re-runs cells whose config changed, and leaves `failed` ones alone unless `retry_failed` (`--retry-failed`; the
returned counts list every failed cell with its error and how many were kept failed from an earlier run). A resumed cell
whose engine refuses the resume (`ResumeRefusedError`, e.g. a checkpoint of another config) restarts afresh;
any other error fails it and keeps its checkpoint. Every cell process
holds an inherited `flock` on `locks/<id>.lock` for its whole life and gets SIGTERM (checkpoint and exit) when
the sweep process dies, so a restarted sweep never runs a cell twice at the same time.
"""

from __future__ import annotations

from muonft_cli.sweep.index import INDEX, SweepIndex
from muonft_cli.sweep.jobs import Job, base_eval_id, default_engine, has_checkpoint
from muonft_cli.sweep.plan import (FINETUNE_SWEEP_RECIPE, METHODS, METRICS, PLAN_FILE, BaseSpec, Cell, SweepPlan,
                                   cell_id, check_base_paths, config_hash, describe_cells, diagnose_sweep_command,
                                   load_plan, load_saved_plan, plan_from_dict, split_seeds)
from muonft_cli.sweep.policy import best_lrs, cell_ppl, prune_weights
from muonft_cli.sweep.scheduler import check_out_dir, run_sweep, worker_env

__all__ = ["INDEX", "SweepIndex", "Job", "base_eval_id", "default_engine", "has_checkpoint", "FINETUNE_SWEEP_RECIPE",
           "METHODS", "METRICS", "PLAN_FILE", "BaseSpec", "Cell", "SweepPlan", "cell_id", "check_base_paths",
           "config_hash", "describe_cells", "diagnose_sweep_command", "load_plan", "load_saved_plan", "plan_from_dict",
           "split_seeds", "best_lrs", "cell_ppl", "prune_weights", "check_out_dir", "run_sweep", "worker_env"]
