"""Streaming checkpoint readers for `muonft diagnose`: one tensor at a time, by header offsets.

Owns finding the 2-D weight matrices of a checkpoint and reading each one alone, so peak memory stays near
the largest matrix (plus its work buffers) however big the model is:

- safetensors (single file, HF dir, sharded HF dir via ``model.safetensors.index.json``): the header comes from
  `muonft_cli.models.safetensors.read_header` (which checks the file is complete) and each tensor is read with
  ``os.pread`` into its own buffer, by the offsets it gives. No
  mmap — looping inside one ``safe_open`` handle keeps the mapped pages of every tensor resident (3.5 GB RSS on
  a 3 GB file), whereas ``pread`` pages only live in the kernel's page cache, not in our RSS.
- GGUF: the header and tensor table come from the `gguf` package's ``GGUFReader`` (it memory-maps the file but
  only the header pages are touched); each tensor's bytes are ``pread`` and dequantised with
  ``gguf.quants.dequantize``.
- which matrices a tensor holds is `muonft_cli.diagnose.layouts`' business (fused q|k|v and gate|up, packed MoE
  experts, with the checkpoint's config.json); a block whose rows are contiguous (one expert of a packed
  tensor, the q rows of a q|k|v) is read alone, by its own byte range. FP8 weights with block scales
  (DeepSeek-V3 / Kimi K2 ``weight_scale_inv``) are dequantised as they are read. GGUF ``ffn_*_exps`` packed
  experts are read one expert at a time. Every ≥2-D tensor not analysed is recorded with its reason.
- peft adapter dirs: ``lora_A``/``lora_B`` pairs become three matrices each (A, B, and the delta
  ``scale·B·A``), and with a base checkpoint the merged weight as well: the matrix peft's ``merge_and_unload``
  produces, ``W₀ + scale·B·A`` for LoRA, ``m ⊙ (W₀ + scale·B·A) / ‖W₀ + scale·B·A‖`` per output row for DoRA
  (``use_dora``, with its magnitude vector m).

Every problem with the input is raised as `UserInputError` before any matrix is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from muonft_cli._common import looks_local
from muonft_cli.errors import UserInputError
from muonft_cli.models.lora import lora_scale, plain_name
from muonft_cli.models.safetensors import TensorEntry as _StEntry
from muonft_cli.models.safetensors import index_shards, read_header
from muonft_cli.diagnose.layouts import Block, Layout, blocks, layout_from_config
from muonft_cli.spectral import layer_type, lora_part

__all__ = ["MatrixSpec", "Checkpoint", "open_checkpoint", "recorded_base", "read_count", "reset_read_count"]

_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "I64": (None, 8), "I32": (None, 4), "I16": (None, 2), "I8": (None, 1), "U8": (None, 1), "BOOL": (None, 1),
}

# Instrumentation (tests and the benchmark read it): tensors read, the largest read (bytes), and how many loaded
# matrices were alive at once (tracked with weakref finalizers on what `MatrixSpec.load` returns).
read_count = {"tensors": 0, "max_bytes": 0, "live": 0, "max_live": 0}


def _track(t: torch.Tensor) -> torch.Tensor:
    """Count ``t`` as a live loaded matrix until it is garbage-collected."""
    read_count["live"] += 1
    read_count["max_live"] = max(read_count["max_live"], read_count["live"])

    def _dead() -> None:
        read_count["live"] -= 1

    weakref.finalize(t, _dead)
    return t


def reset_read_count() -> None:
    """Zero the instrumentation counters."""
    read_count.update(tensors=0, max_bytes=0, live=0, max_live=0)


@dataclass
class MatrixSpec:
    """One 2-D matrix to analyse: its name, layer type, shape, and how to read it (fp32, shape (m, n))."""

    name: str
    layer_type: str
    shape: tuple[int, int]
    load: Callable[[], torch.Tensor]
    nbytes: int = 0
    role: str = "weight"  # weight | lora_A | lora_B | lora_delta | merged
    source: str = ""  # the checkpoint tensor it is read from (several matrices may share one: fused, packed)
    expert: int | None = None  # a routed MoE expert's index (`muonft_cli.diagnose.layouts.sample_experts`)
    group: str | None = None  # that expert's MoE layer

    def read(self, raw: bool = False) -> torch.Tensor:
        """The matrix as fp32, shape ``self.shape`` (counted as live until garbage-collected).

        With ``raw``, a float16/bfloat16/float32 safetensors tensor comes in its stored dtype (no fp32 copy);
        other tensors (GGUF, fp8, computed adapter products) still come as fp32.
        """
        load = getattr(self.load, "raw", None) if raw else None
        return _track((load or self.load)())

    @property
    def raw_bytes(self) -> int:
        """Bytes `read(raw=True)` returns."""
        return self.nbytes if getattr(self.load, "raw", None) else 4 * self.shape[0] * self.shape[1]


@dataclass
class Checkpoint:
    """What `open_checkpoint` found: the kind, the matrices (not yet read), provenance files, skipped tensors."""

    path: str
    kind: str  # hf | safetensors | gguf | adapter
    matrices: list[MatrixSpec]
    provenance: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    total_bytes: int = 0
    base: "Checkpoint | None" = None
    adapter_config: dict | None = None
    base_source: str | None = None  # an adapter's base: "--base", or the file it was read from (muonft.json, ...)
    base_note: str | None = None  # why an adapter has no base (none recorded, not found, a hub id)
    excluded: list[dict] = field(default_factory=list)  # ≥2-D tensors not analysed: name, shape, dtype, reason
    n_tensors: int = 0  # ≥2-D tensors in the checkpoint (read from, excluded, or only experts not sampled)
    not_sampled: list[MatrixSpec] = field(default_factory=list)  # expert matrices left out by sampling
    experts: dict | None = None  # the expert sampling summary (`layouts.sample_experts`), None without MoE
    notes: list[str] = field(default_factory=list)  # layout notes for the report (e.g. fused q|k|v left whole)


def _bad(msg: str) -> UserInputError:
    return UserInputError(msg)


# ------------------------------------------------------------------------------------------ safetensors


def _read_st_header(path: Path) -> list[_StEntry]:
    """The tensors of a safetensors file (`models.safetensors.read_header`: header parsed, every tensor inside the
    file), each of a dtype diagnose can read."""
    entries = read_header(path)
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise _bad(f"{path}: tensor {e.name!r} has unknown dtype {e.dtype!r}; re-save it with a current safetensors")
    return entries


def _pread(path: str, offset: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of ``path`` from ``offset`` into a fresh uint8 array (``np.empty``: no zero-fill pass before the
    read, unlike a ``bytearray``); dropped from the page cache after."""
    buf = np.empty(nbytes, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < nbytes:
            k = os.preadv(fd, [view[done:]], offset + done)
            if k <= 0:
                raise UserInputError(f"{path}: truncated while reading; re-download or re-save the checkpoint")
            done += k
        if hasattr(os, "posix_fadvise"):  # we read each byte once: let the kernel drop it from the page cache
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    read_count["tensors"] += 1
    read_count["max_bytes"] = max(read_count["max_bytes"], nbytes)
    return buf


def _load_st(entry: _StEntry, raw: bool = False) -> torch.Tensor:
    """Read one safetensors tensor by its offsets and return it as fp32 (``raw``: fp16/bf16/fp32 as stored), 2-D.
    Shape: entry.shape."""
    tdtype = _ST_DTYPES[entry.dtype][0]
    buf = _pread(entry.path, entry.offset, entry.nbytes)
    t = torch.frombuffer(buf, dtype=tdtype).reshape(entry.shape)
    if raw and tdtype in (torch.float16, torch.bfloat16, torch.float32):
        return t  # owns the read buffer
    out = t.to(torch.float32)
    if out.data_ptr() == t.data_ptr():
        out = out.clone()  # fp32 on disk: own the memory so the read buffer can go
    return out


def _st_entries(path: Path) -> tuple[list[_StEntry], list[str]]:
    """All safetensors entries of a file or HF dir (single or sharded)."""
    if path.is_file():
        return _read_st_header(path), [str(path)]
    index = path / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        files = [path / f for f in index_shards(index)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise _bad(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing; "
                       "download every shard")
    else:
        files = sorted(path.glob("*.safetensors"))
    entries = []
    for f in files:
        entries.extend(_read_st_header(f))
    return entries, [str(f) for f in files]


def _float_matrix(dt: str) -> bool:
    return _ST_DTYPES[dt][0] is not None and _ST_DTYPES[dt][0].is_floating_point


def _specs_from_entries(entries: list[_StEntry], layout: Layout) -> tuple[list[MatrixSpec], list[str], list[dict]]:
    """The matrices of safetensors entries (fused and packed tensors split by `layouts.blocks`), the >2-D
    tensors not analysed (the report's ``skipped``), and every ≥2-D tensor not analysed with its reason."""
    specs, skipped, excluded = [], [], []
    scales = _fp8_scales(entries)  # FP8 weight name → its scale tensor
    scale_of = {s.name: w for w, s in scales.items()}
    for e in entries:
        if len(e.shape) < 2:
            continue
        full = None
        if e.name in scale_of:
            got = f"FP8 scales (of {scale_of[e.name]}, applied when it is read)"
        elif not _float_matrix(e.dtype):
            got = f"not a floating-point tensor ({e.dtype}): integer or packed-quantised data"
        else:
            got = blocks(e.name, tuple(e.shape), layout)
            if e.name in scales and not isinstance(got, str):
                full = _fp8_loader(e, scales[e.name], layout.fp8_block)
                if full is None:
                    got = (f"FP8 weight with scales of no known layout ({scales[e.name].name} "
                           f"{list(scales[e.name].shape)} fit no {layout.fp8_block[0]}×{layout.fp8_block[1]} block "
                           "of config.json's quantization_config.weight_block_size)")
        if isinstance(got, str):
            excluded.append({"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "reason": got})
            if len(e.shape) > 2:
                skipped.append(f"{e.name} {list(e.shape)} {e.dtype}")
            continue
        whole = len(got) == 1 and got[0].rows is None and got[0].take is None
        for b in got:
            nbytes = e.nbytes if whole else e.nbytes * b.shape[0] * b.shape[1] // max(1, _numel(e.shape))
            load = (full or _st_loader(e)) if whole else _block_loader(e, b, full)
            specs.append(MatrixSpec(b.name, b.layer_type, b.shape, load, nbytes, source=e.name, expert=b.expert,
                                    group=b.group))
    return specs, skipped, excluded


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _st_loader(e: _StEntry) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return _load_st(e)

    load.raw = lambda: _load_st(e, raw=True)  # type: ignore[attr-defined]  # see MatrixSpec.read(raw=True)
    return load


def _load_st_rows(e: _StEntry, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of the first dimension of a safetensors tensor, read alone, as fp32.
    Shape: (r1 - r0, *e.shape[1:])."""
    row = e.nbytes // e.shape[0]
    part = _StEntry(e.path, e.name, e.dtype, (r1 - r0, *e.shape[1:]), e.offset + r0 * row, (r1 - r0) * row)
    return _load_st(part)


def _block_loader(e: _StEntry, b: Block, full: Callable[[], torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
    """The loader of one block of ``e``: only its rows are read, unless ``full`` (e.g. FP8 dequantisation)
    must see the whole tensor first."""
    def load() -> torch.Tensor:
        if full is not None:
            W = full()
            W = W if b.rows is None else W[b.rows[0]:b.rows[1]]
        else:
            W = _load_st(e) if b.rows is None else _load_st_rows(e, *b.rows)
        return (W if b.take is None else b.take(W)).reshape(b.shape)  # (m, n)
    return load


def _fp8_scales(entries: list[_StEntry]) -> dict[str, _StEntry]:
    """FP8 weights and their scale tensors (DeepSeek-V3 / Kimi K2 ``X.weight_scale_inv`` per 128×128 block,
    compressed-tensors ``X.weight_scale`` per tensor or per row): weight name → scale entry."""
    by_name = {e.name: e for e in entries}
    out = {}
    for e in entries:
        for suffix in ("_scale_inv", "_scale"):
            w = by_name.get(e.name[: -len(suffix)]) if e.name.endswith(suffix) else None
            if w is not None and w.dtype.startswith("F8") and _float_matrix(e.dtype):
                out[w.name] = e
    return out


def _fp8_loader(e: _StEntry, s: _StEntry, block: tuple[int, int]) -> Callable[[], torch.Tensor] | None:
    """A loader of the dequantised FP8 weight ``e`` (its values times its scales ``s``: one per tensor, per row,
    or per ``block`` tile as DeepSeek's ``weight_dequant``), or None when the scales' shape fits none of these."""
    if len(e.shape) != 2:
        return None
    m, n = e.shape
    b0, b1 = block
    ss = tuple(s.shape)
    if _numel(ss) == 1 or ss in ((m,), (m, 1)):
        def expand(S: torch.Tensor) -> torch.Tensor:
            return S.reshape(-1, 1) if S.numel() == m else S.reshape(1, 1)
    elif len(ss) == 2 and ss == (-(-m // b0), -(-n // b1)):
        def expand(S: torch.Tensor) -> torch.Tensor:  # (m/b0, n/b1) → (m, n)
            return S.repeat_interleave(b0, 0)[:m].repeat_interleave(b1, 1)[:, :n]
    else:
        return None

    def load() -> torch.Tensor:
        W = _load_st(e)  # (m, n) fp32 of the FP8 values
        return W.mul_(expand(_load_st(s)))

    return load


# ------------------------------------------------------------------------------------------------ gguf


def _gguf_layout(reader) -> Layout:
    """The head counts a GGUF file's metadata gives (``{arch}.attention.head_count`` …), for its ``attn_qkv``."""
    arch = _gguf_field(reader, "general.architecture") or ""
    heads = _gguf_field(reader, f"{arch}.attention.head_count")
    kv = _gguf_field(reader, f"{arch}.attention.head_count_kv") or heads
    hidden = _gguf_field(reader, f"{arch}.embedding_length")
    hd = _gguf_field(reader, f"{arch}.attention.key_length") or (hidden // heads if hidden and heads else None)
    ok = all(isinstance(v, int) and v > 0 for v in (heads, kv, hd))
    return Layout(model_type="gguf", hidden=hidden, heads=heads if ok else None, kv_heads=kv if ok else None,
                  head_dim=hd if ok else None, has_config=ok)


def _gguf_field(reader, key: str):
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    v = f.parts[f.data[0]]
    try:
        return bytes(v).decode("utf-8") if v.dtype.kind == "u" and v.dtype.itemsize == 1 else v.tolist()[0]
    except Exception:  # noqa: BLE001 - metadata is informative only
        return None


def _open_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:  # what gguf raises on bad files
        raise _bad(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:80]}); "
                   "re-download or re-convert it") from None
    size = path.stat().st_size
    specs, skipped, excluded, n_tensors = [], [], [], 0
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # GGUF order: ne0 (columns) first
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise _bad(f"{path}: truncated file — tensor {t.name!r} runs past the end; re-download it")
        if len(ne) >= 2:
            n_tensors += 1
        qtype = GGMLQuantizationType(int(t.tensor_type))
        exps = re.match(r"^(blk\.\d+)\.ffn_(gate|up|down)_exps\.weight$", t.name) if len(ne) == 3 else None
        if exps and min(ne[:2]) >= 2 and int(t.n_bytes) % ne[2] == 0:  # packed experts: ne = [cols, rows, E]
            rows, cols, E, role = ne[1], ne[0], ne[2], exps.group(2)
            per = int(t.n_bytes) // E
            for e in range(E):
                def load_e(t=t, rows=rows, cols=cols, qtype=qtype, e=e, per=per) -> torch.Tensor:
                    buf = _pread(str(path), int(t.data_offset) + e * per, per)
                    W = dequantize(np.frombuffer(buf, dtype=np.uint8).reshape(rows, -1), qtype)  # (rows, cols)
                    return torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)).reshape(rows, cols)

                specs.append(MatrixSpec(f"{t.name}[{e}][{role}]", role, (rows, cols), load_e, per, source=t.name,
                                        expert=e, group=exps.group(1)))
            continue
        if len(ne) != 2 or min(ne) < 2:
            if len(ne) > 2:
                skipped.append(f"{t.name} {ne[::-1]}")
            if len(ne) >= 2:
                why = "a vector: it has no spectrum" if len(ne) == 2 else \
                    f"a {len(ne)}-D GGUF tensor of no known layout"
                excluded.append({"name": t.name, "shape": ne[::-1], "dtype": qtype.name, "reason": why})
            continue
        rows, cols = ne[1], ne[0]

        def load(t=t, rows=rows, cols=cols, qtype=qtype) -> torch.Tensor:
            buf = _pread(str(path), int(t.data_offset), int(t.n_bytes))
            raw = np.frombuffer(buf, dtype=np.uint8).reshape(rows, -1)  # (rows, bytes per row)
            W = dequantize(raw, qtype)  # (rows, cols) float32
            return torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)).reshape(rows, cols)

        if t.name.endswith("attn_qkv.weight"):  # llama.cpp writes every fused q|k|v as [q; k; v] rows
            split = blocks(t.name, (rows, cols), _gguf_layout(reader))
            if not isinstance(split, str) and len(split) == 3:
                for b in split:
                    specs.append(MatrixSpec(b.name, b.layer_type, b.shape,
                                            (lambda load=load, r=b.rows: load()[r[0]:r[1]].contiguous()),
                                            int(t.n_bytes) * b.shape[0] // rows, source=t.name))
                continue
        specs.append(MatrixSpec(t.name, layer_type(t.name), (rows, cols), load, int(t.n_bytes), source=t.name))
    prov = {"gguf": {k: _gguf_field(reader, k) for k in
                     ("general.architecture", "general.name", "general.basename", "general.organization",
                      "general.finetune", "general.size_label")}}
    prov["gguf"] = {k: v for k, v in prov["gguf"].items() if v is not None}
    quant = sorted({GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors})
    prov["gguf"]["tensor_types"] = quant
    del reader
    ck = Checkpoint(str(path), "gguf", specs, prov, skipped, size)
    ck.excluded, ck.n_tensors = excluded, n_tensors
    return ck


# ---------------------------------------------------------------------------------------------- adapters


def _dora_merge(W0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The weight peft's ``merge_and_unload`` writes for a DoRA layer: W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖.

    Shapes: ``W0``, ``delta`` (out, in) (``delta`` already scaled), ``magnitude`` (out,). The norm is peft's
    ``DoraLinearLayer.get_weight_norm``: the L2 norm of each output row of W₀ + s·B·A (over the input dimension,
    one per output feature, what peft and the DoRA paper call "column-wise" for the (in, out) convention), taken
    of the *unmerged* base weight and treated as a constant (detached; no gradients flow here anyway).
    """
    V = W0 + delta  # (out, in)
    norm = torch.linalg.norm(V, dim=1)  # (out,)
    return (magnitude / norm).view(-1, 1) * V


def _base_key(module: str) -> str:
    """peft module path → base checkpoint parameter name (`models.plain_name` + ``.weight``)."""
    return plain_name(module) + ".weight"


def _open_adapter(path: Path, base: Checkpoint | None, base_label: str = "--base") -> Checkpoint:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError:
        raise _bad(f"{path}/adapter_config.json is not valid JSON; re-save the adapter") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad(f"{path}: peft adapter type {cfg.get('peft_type')!r} is not LoRA; diagnose reads LoRA adapters")
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        raise _bad(f"{path}: no adapter_model.safetensors (a .bin adapter is not read, to avoid unpickling); "
                   "re-save it with safe_serialization=True")
    entries = {e.name: e for e in _read_st_header(st)}
    pairs: dict[str, dict[str, _StEntry]] = {}
    magnitudes: dict[str, _StEntry] = {}  # DoRA: module → its magnitude vector m, shape (out,)
    for name, e in entries.items():
        part = lora_part(name)
        if part in ("A", "B") and len(e.shape) == 2:
            module = name.split(".lora_")[0]
            pairs.setdefault(module, {})[part] = e
        elif ".lora_magnitude_vector" in name and len(e.shape) == 1 and _float_matrix(e.dtype):
            magnitudes[name.split(".lora_magnitude_vector")[0]] = e
    use_dora = bool(cfg.get("use_dora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))  # base weights stored (in, out), as GPT-2's Conv1D
    base_map: dict[str, MatrixSpec] = {}
    if base is not None:
        base_map = {s.name: s for s in base.matrices}
    specs: list[MatrixSpec] = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            continue
        A, B = ab["A"], ab["B"]  # A: (r, in), B: (out, r)
        lt = layer_type(module + ".weight")
        scale = lora_scale(cfg, module)
        specs.append(MatrixSpec(A.name, lt, A.shape, _st_loader(A), A.nbytes, role="lora_A"))
        specs.append(MatrixSpec(B.name, lt, B.shape, _st_loader(B), B.nbytes, role="lora_B"))
        shape = (B.shape[0], A.shape[1])

        def delta(A=A, B=B, scale=scale) -> torch.Tensor:
            return scale * (_load_st(B) @ _load_st(A))  # (out, r) @ (r, in) → (out, in)

        specs.append(MatrixSpec(module + ".lora_delta", lt, shape, delta, 4 * shape[0] * shape[1], role="lora_delta"))
        if base is not None:
            bspec = base_map.get(_base_key(module))
            stored = shape[::-1] if fan_in_fan_out else shape
            if bspec is None or tuple(bspec.shape) != stored:
                raise _bad(f"{base_label} {base.path}: it has no matrix {_base_key(module)} of shape {list(stored)} "
                           f"for adapter module {module}; pass the model the adapter was trained on with --base")

            def base_w(bspec=bspec) -> torch.Tensor:  # (out, in), the layout B·A has
                return bspec.load().T.contiguous() if fan_in_fan_out else bspec.load()

            if use_dora:
                mag = magnitudes.get(module)
                if mag is None or mag.shape != (shape[0],):
                    raise _bad(f"{path}: DoRA adapter (use_dora) without a magnitude vector of shape [{shape[0]}] "
                               f"for module {module}; re-save the adapter with peft")

                def merged(base_w=base_w, delta=delta, mag=mag) -> torch.Tensor:
                    return _dora_merge(base_w(), delta(), _load_st(mag))
            else:
                def merged(base_w=base_w, delta=delta) -> torch.Tensor:
                    return base_w() + delta()

            specs.append(MatrixSpec(module + ".merged", lt, shape, merged, bspec.nbytes, role="merged"))
    if not specs:
        raise _bad(f"{path}: adapter has no lora_A/lora_B matrix pairs; pass a LoRA adapter dir or a model")
    prov = _dir_provenance(path)
    ck = Checkpoint(str(path), "adapter", specs, prov, [], st.stat().st_size, base, cfg)
    return ck


# ------------------------------------------------------------------------------------------- provenance


def _dir_provenance(path: Path) -> dict:
    """muonft.json, trainer_state.json / training_args, config.json basics, if present (informative only).

    For an older fine-tuned muonft.json without ``pretrain_optimizer``, also its local base's muonft.json (under
    ``"base muonft.json"``), where the pretraining optimizer may be recorded.
    """
    prov: dict = {}
    for name in ("muonft.json", "trainer_state.json", "config.json", "adapter_config.json"):
        for cand in (path / name, path.parent / name):
            if cand.is_file():
                try:
                    prov[name] = json.loads(cand.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    prov[name] = {"error": "not valid JSON"}
                break
    if "config.json" in prov and isinstance(prov["config.json"], dict):
        c = prov["config.json"]
        prov["config.json"] = {k: c.get(k) for k in ("model_type", "architectures", "_name_or_path",
                                                      "hidden_size", "num_hidden_layers") if k in c}
    if "trainer_state.json" in prov and isinstance(prov["trainer_state.json"], dict):
        ts = prov["trainer_state.json"]
        prov["trainer_state.json"] = {k: ts.get(k) for k in ("global_step", "max_steps", "num_train_epochs")}
    mj = prov.get("muonft.json")
    if isinstance(mj, dict) and mj.get("mode") == "finetune" and "pretrain_optimizer" not in mj:
        # written before muonft recorded the base's pretraining optimizer: look in the base's own muonft.json
        base = Path(str(mj.get("base_model") or "")).expanduser()
        if mj.get("base_model") and base.is_absolute() and (base / "muonft.json").is_file():
            try:
                prov["base muonft.json"] = json.loads((base / "muonft.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                pass
    ta = path / "training_args.json"
    if ta.is_file():
        try:
            a = json.loads(ta.read_text())
            prov["training_args"] = {k: a.get(k) for k in ("optim", "learning_rate", "weight_decay") if k in a}
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return prov


# ------------------------------------------------------------------------------------------------ entry


def recorded_base(path: str | os.PathLike) -> tuple[str | None, str | None, str | None]:
    """The base model an adapter dir records, if it exists locally.

    Looks at the adapter's own ``muonft.json`` (``base_model``), else its ``adapter_config.json``
    (``base_model_name_or_path``); a relative path is taken from the current directory.

    Returns:
        ``(base_path, source, note)``: ``base_path`` an existing local path (else None), ``source`` the file
        that named it (``"muonft.json"`` / ``"adapter_config.json"``, None when neither names one), ``note``
        why there is no usable base (None when there is one).
    """
    p = Path(path).expanduser()
    for name, key in (("muonft.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        f = p / name
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        spec = rec.get(key) if isinstance(rec, dict) else None
        if not spec:
            continue
        spec = str(spec)
        cand = Path(spec).expanduser()
        if cand.exists():
            return str(cand), name, None
        if not looks_local(spec) and not cand.suffix and spec.count("/") == 1:
            return None, name, (f"the adapter's base {spec} (from its {name}) is a hub id, and diagnose reads "
                                "local files only: pass --base with a local copy")
        return None, name, (f"the adapter's base {spec} (from its {name}) was not found (looked at "
                            f"{cand.resolve()}): pass --base PATH")
    return None, None, "the adapter records no base model (muonft.json, adapter_config.json): pass --base PATH"


def _st_checkpoint(p: Path, kind: str, entries: list[_StEntry], files: list[str], folder: Path) -> Checkpoint:
    """A safetensors checkpoint's matrices, split by the layout its folder's config.json describes."""
    cfg = None
    if (folder / "config.json").is_file():
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = None  # provenance reports it as not valid JSON
    specs, skipped, excluded = _specs_from_entries(entries, layout_from_config(cfg))
    ck = Checkpoint(str(p), kind, specs, _dir_provenance(folder), skipped, sum(Path(f).stat().st_size for f in files))
    ck.excluded, ck.n_tensors = excluded, sum(len(e.shape) >= 2 for e in entries)
    whole = sorted({s.source for s in specs if s.layer_type == "qkv"})
    if whole:
        ck.notes.append(f"{len(whole)} fused q|k|v matrices analysed whole (type qkv): their head layout needs "
                        f"config.json's head counts{' (none beside the checkpoint)' if cfg is None else ''}")
    return ck


def open_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None, *,
                    base_source: str | None = None) -> Checkpoint:
    """Find the matrices of a checkpoint without reading them.

    Args:
        path: an HF model dir (single or sharded safetensors), a ``.safetensors`` file, a peft adapter dir
            (``adapter_config.json``), or a ``.gguf`` file.
        base: for an adapter, the base model (any of the above) to also analyse the merged weights
            (as peft's ``merge_and_unload`` makes them: ``W₀ + s·B·A``, or DoRA's rescaled form).

    Raises:
        UserInputError: missing path, not a checkpoint, corrupt or truncated file, no 2-D matrices.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise _bad(f"{p}: no such file or directory; pass a model dir, .safetensors, .gguf, or adapter dir")
    label = "--base" if base_source in (None, "--base") else f"the adapter's base (from its {base_source})"
    try:
        base_ck = open_checkpoint(base) if base is not None else None
    except UserInputError as e:
        if base_source in (None, "--base"):
            raise
        raise _bad(f"{label} could not be read: {e}; pass --base PATH") from None
    if p.is_dir() and (p / "adapter_config.json").is_file():
        ck = _open_adapter(p, base_ck, label)
        ck.base_source = (base_source or "--base") if base_ck is not None else None
        return ck
    if base_ck is not None:
        raise _bad(f"--base is only for LoRA adapter dirs, and {p} is not one (no adapter_config.json); drop --base")
    if p.is_file() and p.suffix == ".gguf":
        ck = _open_gguf(p)
    elif p.is_file() and p.suffix == ".safetensors":
        entries, files = _st_entries(p)
        ck = _st_checkpoint(p, "safetensors", entries, files, p.parent)
    elif p.is_dir():
        entries, files = _st_entries(p)
        if not files:
            hint = " (it holds pytorch_model.bin: re-save with safe_serialization=True)" \
                if any(p.glob("*.bin")) else ""
            raise _bad(f"{p}: not a checkpoint — no *.safetensors, adapter_config.json or .gguf inside{hint}; "
                       "pass a model dir, a .safetensors/.gguf file or an adapter dir")
        ck = _st_checkpoint(p, "hf", entries, files, p)
    else:
        raise _bad(f"{p}: not a checkpoint (expected a model dir, .safetensors, .gguf, or adapter dir)")
    if not ck.matrices:
        raise _bad(f"{p}: no 2-D weight matrices found; pass a model checkpoint, not a tokenizer or config")
    return ck
