"""Distributed NS hook with a real torch.distributed process group: 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# thin (Gram path, min dim <= 64) and direct-path matrices; odd bucket sizes exercise the padding
SHAPES = [(8, 96)] * 3 + [(96, 8)] * 2 + [(16, 4, 3, 3)] + [(72, 80)] * 3 + [(80, 72)]
N_THIN, N_BIG = 6, 4
STEPS = 3


def _run(cls, distributed: bool, shard_thin: bool = False, **kw):
    from muonft_cli.optim import AdaMuon, Muon  # noqa: F401  (spawned processes import fresh)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = cls(params, lr=0.02, weight_decay=0.01, ns_dtype="fp32", **kw)
    if distributed:
        opt.set_distributed(shard_thin=shard_thin)
    per_step = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)  # identical "all-reduced" grads on every rank
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        per_step.append(opt.ns_matrices_last_step)
    return params, opt, per_step


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from muonft_cli.optim import AdaMuon, Muon

        report = {}
        variants = [
            ("muon", Muon, {}),
            ("muon_shard_thin_small_chunks", Muon, {"ns_chunk_bytes": 1, "shard_thin": True}),
            ("adamuon", AdaMuon, {}),
        ]
        for name, cls, kw in variants:
            dparams, dopt, per_step = _run(cls, True, **kw)
            kw.pop("shard_thin", None)
            lparams, lopt, _ = _run(cls, False, **kw)
            err = max(((a - b).abs().max().item() for a, b in zip(dparams, lparams)))
            # every rank ends with the same weights
            flat = torch.cat([p.detach().flatten() for p in dparams])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            report[name] = {
                "max_err_vs_single": err,
                "ranks_agree": all(torch.equal(gathered[0], t) for t in gathered),
                "ns_done": dopt.ns_matrices_done,
                "ns_per_step": per_step,
                "single_ns_done": lopt.ns_matrices_done,
            }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_split(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    total = STEPS * len(SHAPES)
    for name in ("muon", "muon_shard_thin_small_chunks", "adamuon"):
        done = [rep[name]["ns_done"] for rep in reports]
        assert reports[0][name]["single_ns_done"] == total
        if "shard_thin" in name:  # every matrix orthogonalised by exactly one rank
            assert sum(done) == total and abs(done[0] - done[1]) <= STEPS
        else:  # thin ones locally on every rank, the direct-path ones split round-robin
            assert done == [STEPS * (N_THIN + N_BIG // 2)] * world
        for rep in reports:
            assert rep[name]["ranks_agree"]
            assert rep[name]["max_err_vs_single"] < 1e-6, (name, rep[name])
