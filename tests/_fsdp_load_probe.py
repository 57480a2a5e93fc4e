"""torchrun entry point for the sharded-loading test: `_fsdp_load_probe.py PROBE_DIR muonft-args...` runs the
muonft CLI and writes, per rank, PROBE_DIR/rank{R}.json — how often this rank called the weight loaders
(muonft's `_load_weights`, transformers' `from_pretrained`, safetensors' `safe_open` / `load_file`) and the
bytes of real (non-meta) parameter storage its model held just before FSDP2 sharded it — and
PROBE_DIR/logits{R}.pt, the sharded model's logits on fixed ids right after `wrap_fsdp` (its shards filled).
After that no-grad forward the model is resharded: FSDP2 leaves the root unsharded after a forward, and a
first training step from that state reduces the root's gradients wrongly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers.modeling_utils as tmu

import muonft_cli.train as train_mod
from muonft_cli.models import load as load_mod
from muonft_cli.train import distributed as dist_mod

probe = Path(sys.argv[1])
calls = {"_load_weights": 0, "from_pretrained": 0, "safe_open": 0, "load_file": 0}
record: dict = {"calls": calls}


def _counted(name, fn):
    def wrapper(*a, **k):
        calls[name] += 1
        return fn(*a, **k)
    return wrapper


load_mod._load_weights = _counted("_load_weights", load_mod._load_weights)
_fp = tmu.PreTrainedModel.from_pretrained.__func__
tmu.PreTrainedModel.from_pretrained = classmethod(_counted("from_pretrained", _fp))
tmu.safe_open = _counted("safe_open", tmu.safe_open)
safetensors.safe_open = _counted("safe_open", safetensors.safe_open)
safetensors.torch.load_file = _counted("load_file", safetensors.torch.load_file)

_wrap, _fill = dist_mod.fsdp_wrap, train_mod.wrap_fsdp


def _wrap_probe(model, info):
    record["real_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    record["all_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return _wrap(model, info)


def _fill_probe(model, info, cfg):
    done = _fill(model, info, cfg)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 17, device=info.device)[None]).logits
    model.train(was); model.reshard()
    torch.save(logits.cpu(), probe / f"logits{info.rank}.pt")
    return done


dist_mod.fsdp_wrap, train_mod.wrap_fsdp = _wrap_probe, _fill_probe

if __name__ == "__main__":
    from muonft_cli.cli import app

    sys.argv = ["muonft", *sys.argv[2:]]
    try:
        app()
    finally:
        (probe / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
