"""The memory plan (`muonft finetune|pretrain ... --plan`): the bytes a run needs per device, before it runs.

Owns `plan_memory` (returns data; `render.print_plan` prints it) and `parse_bytes` (`--gpu-memory 24GiB`). The
model is built on the meta device from its config.json alone (no weight is read, nothing is downloaded but a hub
id's config.json, nothing is written), the run's LoRA is attached with the same `apply_lora` the run uses, and
the real optimizer routing (`optim.routing.split_params`) decides which parameters carry Muon's one momentum
buffer and which AdamW's two moments. The terms and their formulas (weights by dtype and 4-bit NF4, gradients,
optimizer state, activations per layer with and without gradient checkpointing, the loss, the optimizer step's
workspace, DDP buckets, FSDP2 sharding and its all-gathers, autocast's weight copies) are in docs/formulas.md,
"Memory plan"; `tests/test_plan_memory.py` checks the total against measured peak RSS on CPU.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from muonft_cli._common import AUTO_OPTIMIZER, first_line, hub_offline, looks_like_hub_id
from muonft_cli.errors import UserInputError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: Bytes per parameter of a bitsandbytes NF4 weight with double quantisation (peft/QLoRA's setting): 4 bits,
#: one 8-bit absmax per block of 64, one fp32 absmax (of the absmaxes) per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def parse_bytes(text: str) -> int:
    """`24GiB`, `80GB`, `512MiB`, `1.5TiB` or a plain number of bytes -> bytes (GiB = 2**30, GB = 10**9)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserInputError(f"--gpu-memory '{text}' is not a memory size: use e.g. 24GiB, 80GB or 40960MiB")
    return int(float(m.group(1)) * _UNITS[unit])


# ------------------------------------------------------------------------------------------ the model


def _hf_config(cfg: Any, mode: str) -> tuple[Any, str]:
    """(transformers config, where it came from) for the run's model, from config.json alone."""
    from muonft_cli import models

    if mode == "pretrain":
        ids: dict[str, Any] = {"vocab_size": cfg.model.vocab_size}
        if cfg.model.tokenizer:
            tok = models.load_tokenizer(cfg.model.tokenizer, cfg.model.offline, cfg.model.trust_remote_code)
            ids = {"vocab_size": len(tok)}
        return models.load.pretrain_config(cfg.model, ids), cfg.model.model_config or f"preset {cfg.model.preset}"
    name = cfg.model.name_or_path
    if name.startswith("builtin:") or name.lower().endswith(".gguf"):
        raise UserInputError(f"--plan: '{name}' is a GGUF file and has no config.json: pass the HF folder or hub "
                             "id of the original model (--plan builds the model from its config.json alone)")
    p = Path(name).expanduser()
    if p.exists() or not looks_like_hub_id(name):
        if not p.exists():
            raise UserInputError(f"--plan: '{name}' does not exist: pass a HF model folder (with config.json) "
                                 "or a hub id")
        folder = p.parent if p.is_file() else p
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise UserInputError(f"--plan: '{name}' is a LoRA adapter: plan it on its base with --model BASE "
                                 "--lora-rank R")
        if not (folder / "config.json").is_file():
            raise UserInputError(f"--plan: '{name}' has no config.json (--plan builds the model from config.json "
                                 "alone): pass a HF model folder, a config.json's folder, or a hub id")
        target, where = str(folder), str(folder / "config.json")
    else:
        target, where = name, f"{name} (hub config.json)"
    from transformers import AutoConfig

    try:  # a hub id: only config.json is fetched (or read from the local HF cache when offline)
        return AutoConfig.from_pretrained(target, trust_remote_code=cfg.model.trust_remote_code,
                                          local_files_only=cfg.model.offline or hub_offline()), where
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"--plan: cannot read the config.json of '{name}' ({first_line(e)}): pass a local "
                             "HF folder, or a hub id while online") from None


def _meta_model(hf_config: Any, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"--plan: this config.json cannot build a causal LM ({first_line(e)})") from None


def _shape(hf_config: Any) -> dict[str, Any]:
    """The sizes the activation formula needs (Llama names; transformers' attribute maps alias GPT-2's)."""
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h = int(c.hidden_size)
    heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or h // heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    return {"hidden": h, "intermediate": int(inter), "layers": int(c.num_hidden_layers), "heads": heads,
            "kv_heads": kv, "head_dim": head_dim, "vocab": int(c.vocab_size),
            "attn_implementation": getattr(c, "_attn_implementation", None) or "sdpa",
            "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False))}


# ------------------------------------------------------------------------------------------ the terms


def optimizer_state_bytes(name: str, routes: list[Any], shard: float = 1.0) -> int:
    """Bytes of optimizer state for the routed trainable parameters (fp32 state, like the parameters).

    adamw: `exp_avg` + `exp_avg_sq` (+ a 4-byte `step`) per parameter; the Muon family: per Muon matrix one
    `momentum_buffer` (AdaMuon + a full `second_moment`; NorMuon + a `row_second_moment` of out-features), and
    AdamW's two moments and step per parameter of its auxiliary AdamW group. `shard`: 1/world under FSDP2.
    """
    total = 0
    for r in routes:
        n = r.param.numel()
        if name == "adamw" or r.kind == "adamw":
            total += 8 * n * shard + 4
        elif name == "adamuon":
            total += 8 * n * shard
        elif name == "normuon":
            rows = r.param.shape[1] if r.transposed else r.param.shape[0]
            total += 4 * (n + rows) * shard
        else:  # muon, muon-pe
            total += 4 * n * shard
    return int(total)


_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


def _layer_bytes(s: dict[str, Any], seq: int, c: dict[str, Any]) -> int:
    """Saved-for-backward bytes per token of one decoder layer (docs/formulas.md, "Memory plan").

    `c`: `compute` (bytes of a matmul output), `cast_copies` (bf16 autocast over fp32 weights: every Linear
    that needs its input saves its own bf16 cast of it), `lora_fp32_inputs` (a half-precision base without
    autocast: peft casts each LoRA A input to fp32 and A saves it), `lora_cast_inputs` (a half-precision base
    under autocast: that fp32 copy is cast back, and A saves the bf16 cast), `consumers` (Linears reading the
    attention / MLP norm output that need it saved: 3 and 2 in full fine-tuning, the LoRA targets among them),
    `lora_in` (Σ in-features of the layer's LoRA targets), `lora_r` (Σ ranks of its LoRA A outputs).
    """
    h, i = s["hidden"], s["intermediate"]
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    cb = c["compute"]
    total = 4 * (4 * h + 2)  # each RMSNorm in fp32: its input and input·rsqrt (+ the rsqrt)
    if c["cast_copies"]:
        total += 2 * h * (c["consumers"][0] + c["consumers"][1])
    else:
        total += cb * 2 * h  # the two norm outputs, shared by the Linears that read them
    if c["lora_fp32_inputs"]:
        total += 4 * c["lora_in"]
    elif c["lora_cast_inputs"]:
        total += 2 * c["lora_in"]
    total += cb * (3 * q + 2 * kv + 4 * i)  # q, k after RoPE, v; SDPA out and o_proj's input; MLP: 4 × i
    total += 4 * s["heads"]  # SDPA's logsumexp (fp32), one per head
    if s["attn_implementation"] == "eager":
        total += cb * 2 * s["heads"] * seq  # the softmax output and the probabilities the value matmul saves
    total += (4 if c["lora_fp32_inputs"] else cb) * c["lora_r"]  # each LoRA A output, saved by B
    return total


def _activations(s: dict[str, Any], micro: int, seq: int, c: dict[str, Any], checkpointing: bool) -> int:
    """Peak activation bytes of one micro-batch (end of forward / start of backward), docs/formulas.md."""
    h, v, L = s["hidden"], s["vocab"], s["layers"]
    per_layer = _layer_bytes(s, seq, c)
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time in the backward pass
        layers = L * c["residual"] * h + per_layer
    else:
        layers = L * per_layer
    from muonft_cli.train.batching import NLL_CHUNK_ELEMENTS

    outside = c["residual"] * h + 4 * (2 * h + 1) + c["compute"] * h  # embeddings out, final norm, head input
    # the loss (train.batching._ChunkedNLL): the logits and, in its backward pass, their gradient (c each per
    # vocabulary entry) and one fp32 chunk buffer (≤ NLL_CHUNK_ELEMENTS entries; none in the backward pass of
    # fp32 logits, whose softmax is formed in the gradient itself)
    loss = v * 2 * c["compute"] + 4
    chunk = 4 * min(micro * seq * v, NLL_CHUNK_ELEMENTS)
    return int(micro * seq * (layers + outside + loss) + chunk)


def _muon_workspace(routes: list[Any], ns_bytes: int, chunk_bytes: int, shard_world: int,
                    native_threads: int = 0) -> int:
    """The largest Newton–Schulz chunk: stacked input and its iterate (2·X) + three r×r Gram-sized blocks, and
    the fp32 Nesterov input of that chunk (`optim.plan`: same-shape matrices stacked, ≤ ns_chunk_bytes).
    With ``native_threads`` (the native CPU kernel steps the fp32 thin matrices): their workspace is the
    kernel's scratch instead, per thread the largest thin matrix in fp32 plus a 64 × 512 float64 block."""
    import torch

    from muonft_cli import native

    buckets: dict[tuple[int, int], int] = {}
    native_fp32 = 0
    for r in routes:
        if r.kind != "muon":
            continue
        rows, cols = r.param.shape[0], math.prod(r.param.shape[1:])
        key = (min(rows, cols), max(rows, cols))
        if native_threads and key[0] <= native.MAX_RANK and r.param.dtype == torch.float32:
            native_fp32 = max(native_fp32, rows * cols)
            continue
        buckets[key] = buckets.get(key, 0) + 1
    best = native.planned_scratch_bytes(native_fp32, native_threads) if native_fp32 else 0
    for (a, b), count in buckets.items():
        thin = a <= 64
        item = ns_bytes if not thin else 4
        per_chunk = max(1, chunk_bytes // max(1, a * b * item))
        n = min(count, per_chunk)
        if shard_world > 1 and not thin:
            n = max(1, math.ceil(n / shard_world))
        best = max(best, n * (2 * a * b * item + 3 * a * a * item + 4 * a * b))
    return best


def plan_memory(cfg: Any, mode: str, *, world_size: int | None = None, gpu_memory: int | None = None) -> dict:
    """The memory plan of `cfg` (a resolved `RunConfig`) for `mode` ("finetune" / "pretrain"), per device.

    Args:
        cfg: the run's config (model, LoRA, optimizer, micro-batch, seq-len, strategy, dtypes).
        mode: "finetune" or "pretrain".
        world_size: devices the run is spread over (default: $WORLD_SIZE, else 1).
        gpu_memory: bytes of one GPU to fit into (None: the local CUDA GPU's, else no fit is judged). Given,
            the plan is for CUDA (auto base dtype = bf16 for LoRA, bf16 autocast as `--dtype bf16` asks).

    Returns:
        A JSON-ready dict: `params`, `trainable_params`, `bytes` {weights, gradients, optimizer_state,
        activations, activations_checkpointed, activations_other_mode, step_workspace, ddp_buckets,
        fsdp_gather, autocast_copies, total}, `fits`, `max_micro_batch`, `gpu_memory`, and the settings
        planned for (`model`, `world_size`, `strategy`, `base_dtype`, `optimizer`, `micro_batch_size`,
        `seq_len`, `gradient_checkpointing`, `device`, `notes`). Raises `UserInputError` for a model without
        config.json and for settings the run would refuse.
    """
    import torch

    from muonft_cli.optim.plan import DEFAULT_CHUNK_BYTES
    from muonft_cli.optim.routing import split_params
    from muonft_cli.train.batching import micro_batch_size as local_sizes

    notes: list[str] = []
    lora = cfg.lora.rank is not None
    if mode == "finetune" and not cfg.model.name_or_path:
        raise UserInputError("--plan needs the model: pass --model PATH (a HF folder with config.json) or a hub id")
    if mode == "pretrain":
        from muonft_cli.train.build import check_pretrain_shape

        check_pretrain_shape(cfg, what="--plan for pretrain")
    if cfg.model.load_in_4bit and not lora:
        raise UserInputError("--load-in-4bit quantises a frozen base: it needs LoRA (add --lora-rank R)")
    if not lora and cfg.model.base_dtype not in ("auto", "fp32"):
        raise UserInputError(f"--base-dtype {cfg.model.base_dtype} is for a LoRA run's frozen base; full "
                             "fine-tuning keeps fp32 master weights (use --dtype bf16 for bf16 compute)")
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 1:
        raise UserInputError(f"--world-size must be >= 1, got {world}")
    optim_name = cfg.optimizer.name
    if optim_name == AUTO_OPTIMIZER:
        if not lora:
            raise UserInputError("--plan with --optim auto on a full fine-tune: auto reads the weights to choose; "
                                 "pass --optim adamw or muon to plan each")
        optim_name = "muon"  # auto's rule for LoRA runs
        notes.append("--optim auto plans muon (auto's choice for LoRA runs)")

    dev_spec = str(cfg.train.device or "auto").lower()
    cuda_here = torch.cuda.is_available() and dev_spec != "cpu"
    on_cuda = gpu_memory is not None or cuda_here or dev_spec.startswith("cuda")
    if gpu_memory is None and cuda_here:
        idx = int(dev_spec.split(":")[1]) if dev_spec.startswith("cuda:") else 0
        gpu_memory = int(torch.cuda.get_device_properties(idx).total_memory)
    if cfg.model.load_in_4bit:
        base_dtype = "nf4"
        if not on_cuda:
            notes.append("--load-in-4bit runs on CUDA only: planned as for a GPU")
            on_cuda = True
    elif lora:
        base_dtype = cfg.model.base_dtype if cfg.model.base_dtype != "auto" else ("bf16" if on_cuda else "fp32")
    else:
        base_dtype = "fp32"
    strategy = cfg.train.strategy if world > 1 else "single"
    if world == 1 and cfg.train.strategy == "fsdp":
        notes.append("--strategy fsdp with one process runs unsharded")
    shard = 1.0 / world if strategy == "fsdp" else 1.0

    hf_config, source = _hf_config(cfg, mode)
    if mode == "pretrain" and not cfg.model.tokenizer:
        notes.append(f"vocabulary planned at --vocab-size {cfg.model.vocab_size} (the BPE trained on the data may "
                     "come out smaller)")
    model = _meta_model(hf_config, cfg.model.trust_remote_code)
    shape = _shape(model.config)
    total_params = sum(p.numel() for p in model.parameters())
    if lora:
        from muonft_cli.models.lora import apply_lora

        lora_cfg = SimpleNamespace(**{k: getattr(cfg.lora, k) for k in ("rank", "alpha", "dropout", "targets")},
                                   variant=cfg.lora.variant if cfg.lora.variant in ("lora", "rslora", "dora")
                                   else "lora")  # PiSSA/OLoRA: the same shapes; their SVD init needs weights
        model = apply_lora(model, lora_cfg)
    split = split_params(model, lora_a=cfg.optimizer.lora_a if optim_name != "adamw" else "muon")
    routes = list(split)
    trainable = sum(r.param.numel() for r in routes)
    trainable_ids = {id(r.param) for r in routes}
    frozen = [(n, p) for n, p in model.named_parameters() if id(p) not in trainable_ids]

    # weights: trainable fp32; a frozen base in its dtype (NF4: its Linear weights but the head, the rest fp32
    # as peft's prepare_model_for_kbit_training leaves them)
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    linears = {id(m.weight): m is head for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weights = 4 * trainable
    linear_frozen = 0
    for _, p in frozen:
        if base_dtype == "nf4":
            weights += (NF4_BYTES_PER_PARAM if linears.get(id(p)) is False else 4) * p.numel()
        else:
            weights += _DTYPE_BYTES[base_dtype] * p.numel()
        if id(p) in linears:
            linear_frozen += p.numel()
    weights = int(weights * shard)
    gradients = int(4 * trainable * shard)
    opt_state = optimizer_state_bytes(optim_name, routes, shard)

    # compute dtype: bf16 autocast on CUDA with --dtype bf16; a bf16/fp16/NF4 base computes in half precision
    half_base = base_dtype in ("bf16", "fp16", "nf4")
    autocast = on_cuda and (cfg.model.dtype == "bf16" or half_base)  # a half base runs under autocast on CUDA
    layer0 = {}  # the Linears of the first decoder layer that LoRA targets: suffix -> in-features
    for n, mod in model.named_modules():
        if n.endswith(".lora_A.default") and re.search(r"\.layers\.0\.", n):
            layer0[n.split(".")[-3]] = mod.weight.shape[1]
    if lora:
        consumers = (sum(t in layer0 for t in _ATTN_IN), sum(t in layer0 for t in _MLP_IN))
    else:
        consumers = (3, 2)
    acts_cfg = {"compute": 2 if (autocast or half_base) else 4, "residual": 2 if half_base and not autocast else 4,
                "cast_copies": autocast and not half_base, "consumers": consumers,
                "lora_fp32_inputs": lora and half_base and not autocast,
                "lora_cast_inputs": lora and autocast and half_base,
                "lora_in": sum(layer0.values()), "lora_r": len(layer0) * (cfg.lora.rank or 0)}
    autocast_copies = 0
    if autocast and not half_base and strategy != "fsdp":  # bf16 casts of every fp32 Linear weight, kept for
        # the backward pass (FSDP2 computes in bf16 through its MixedPrecisionPolicy instead: gathers in bf16)
        linear_trainable = sum(r.param.numel() for r in routes if id(r.param) in linears)
        autocast_copies = int(2 * (linear_trainable + linear_frozen) * shard)

    local, micro = local_sizes(cfg.train.batch_size, cfg.train.micro_batch_size, world)
    seq = cfg.data.seq_len
    ckpt = bool(cfg.train.gradient_checkpointing)

    def acts(b: int, checkpointing: bool) -> int:
        return _activations(shape, b, seq, acts_cfg, checkpointing)

    # the optimizer step's transient: torch's foreach AdamW (CPU) makes one sqrt(v) copy of its tensors
    # (fused AdamW on CUDA makes none); Muon: its largest Newton–Schulz chunk
    adamw_numel = sum(r.param.numel() for r in routes if optim_name == "adamw" or r.kind == "adamw")
    ns_bytes = 2 if on_cuda or cfg.optimizer.ns_dtype == "bf16" else 4
    if cfg.optimizer.ns_dtype == "fp32":
        ns_bytes = 4
    if not on_cuda and cfg.optimizer.ns_dtype == "auto":
        from muonft_cli.optim.orthogonalize import resolve_ns_dtype

        ns_bytes = resolve_ns_dtype("auto", "cpu").itemsize
    step_ws = (0 if on_cuda else int(4 * adamw_numel * shard))
    if optim_name != "adamw":  # the AdamW group steps first, its copy freed before Newton–Schulz runs
        from muonft_cli import native

        fused = optim_name in ("muon", "muon-pe") and cfg.optimizer.update_rank is None and strategy != "fsdp"
        threads = torch.get_num_threads() if fused and not on_cuda and native.expected() else 0
        step_ws = max(step_ws, _muon_workspace(routes, ns_bytes, DEFAULT_CHUNK_BYTES,
                                               world if strategy != "single" else 1, threads))
    ddp_buckets = gradients if strategy == "ddp" else 0  # DDP's flat gradient buckets beside .grad
    fsdp_gather = 0
    if strategy == "fsdp":  # the unsharded parameters of two layers (current + prefetched) and one layer's grads
        layer_params = (total_params - shape["vocab"] * shape["hidden"] * (1 if shape["tied_embeddings"] else 2)) \
            / max(1, shape["layers"])
        per_param = {"fp32": 2 if autocast else 4, "bf16": 2, "fp16": 2, "nf4": NF4_BYTES_PER_PARAM}[base_dtype]
        layer_trainable = trainable / max(1, shape["layers"])
        fsdp_gather = int(2 * layer_params * per_param + 4 * layer_trainable)
    persistent = weights + opt_state + gradients + ddp_buckets

    def total(b: int) -> int:
        return persistent + max(acts(b, ckpt) + autocast_copies + fsdp_gather, step_ws)

    activations = acts(micro, ckpt)
    max_micro = None
    fits = None
    if gpu_memory is not None:
        fits = total(micro) <= gpu_memory
        lo, hi = 0, 1
        while total(hi) <= gpu_memory and hi < 2**24:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= gpu_memory else (lo, mid)
        max_micro = lo
    else:
        notes.append("no --gpu-memory given and no CUDA GPU here: no fit judged")
    if on_cuda:
        notes.append("the CUDA context and allocator caching (~0.5-1 GiB) are not in the total")
    return {
        "model": source, "mode": mode, "device": "cuda" if on_cuda else "cpu", "world_size": world,
        "strategy": strategy, "base_dtype": base_dtype,
        "compute_dtype": "fp32" if acts_cfg["compute"] == 4 else "fp16" if base_dtype == "fp16" else "bf16",
        "optimizer": optim_name, "lora_rank": cfg.lora.rank, "micro_batch_size": micro, "local_batch_size": local,
        "seq_len": seq, "gradient_checkpointing": ckpt,
        "params": int(total_params + (trainable if lora else 0)), "trainable_params": int(trainable),
        "muon_params": int(sum(r.param.numel() for r in routes if r.kind == "muon" and optim_name != "adamw")),
        "bytes": {
            "weights": weights, "gradients": gradients, "optimizer_state": opt_state,
            "activations": activations, "activations_checkpointed": acts(micro, True),
            "activations_not_checkpointed": acts(micro, False),
            "step_workspace": step_ws, "ddp_buckets": ddp_buckets, "fsdp_gather": fsdp_gather,
            "autocast_copies": autocast_copies, "total": total(micro),
        },
        "gpu_memory": gpu_memory, "fits": fits, "max_micro_batch": max_micro, "notes": notes,
    }
