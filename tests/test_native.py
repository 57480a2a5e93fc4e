"""The native thin-matrix kernel (:mod:`muonft_cli.native`) against the torch path and references: the
same optimizer step (every r the kernel specialises and others, wide and tall, several blocks, groups,
Nesterov on/off, both NS methods), float64-level accuracy on ill-conditioned matrices, the torch path
taking over whenever the kernel cannot run, and its build cache (fallbacks, concurrent builds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import muonft_cli.native as native
from muonft_cli.optim import Muon, orthogonalize, update_scale
from _helpers_optim import matrix_with_condition

REPO = Path(__file__).resolve().parents[1]
F32 = torch.float32


@pytest.fixture
def kernel():
    k = native.thin_kernel()
    if k is None:
        pytest.skip(f"native kernel: {native.status()['thin']}")
    return k


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _train(monkeypatch, use_native: bool, init, grads_seq, groups, **kw):
    """Params and momentum buffers after stepping a fresh Muon through ``grads_seq``; counts kernel calls."""
    calls = []
    with monkeypatch.context() as mp:
        if use_native:
            k = native.thin_kernel()
            real = k.step
            mp.setattr(k, "step", lambda *a: calls.append(len(a[3]) // 2) or real(*a))
        else:
            mp.setattr(native, "thin_kernel", lambda: None)
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        opt = Muon([dict(params=[ps[i] for i in idx], **g) for idx, g in groups], ns_dtype="fp32", **kw)
        for grads in grads_seq:
            for p, g in zip(ps, grads):
                p.grad = g() if callable(g) else g.clone()
            opt.step()
    return [p.detach() for p in ps], [opt.state[p]["momentum_buffer"] for p in ps], calls


@pytest.mark.parametrize("method", ["jordan", "polar_express"])
def test_kernel_step_equals_the_torch_path(kernel, monkeypatch, method):
    """Same weights and momentum as the torch fused path over three steps, for every r the kernel
    specialises (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) and others (3, 13), wide and tall, matrices spanning
    several cache blocks and columns past the last full vector, and groups with their own lr, decay,
    scaling, momentum and Nesterov flag."""
    torch.manual_seed(3)
    shapes = [(8, 5000), (9000, 8), (4, 700), (700, 4), (16, 333), (333, 16), (32, 96), (96, 32),
              (1, 50), (50, 1), (3, 77), (77, 3), (13, 130), (130, 13), (64, 200), (200, 64), (8, 64),
              (2, 90), (90, 2), (12, 301), (301, 12), (24, 250), (250, 24), (48, 140), (140, 48),
              (16, 4099), (4099, 16)]
    init = [torch.randn(*s) * 0.1 for s in shapes]
    grads_seq = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    groups = [(list(range(0, len(shapes), 2)), dict(lr=0.02, weight_decay=0.1, scaling="original")),
              (list(range(1, len(shapes), 2)), dict(lr=0.05, weight_decay=0.0, scaling="match_rms_adamw",
                                                    momentum=0.9, nesterov=False))]
    W_t, M_t, _ = _train(monkeypatch, False, init, grads_seq, groups, ns_method=method)
    W_n, M_n, calls = _train(monkeypatch, True, init, grads_seq, groups, ns_method=method)
    assert calls == [len(shapes)] * 3  # every matrix, one kernel call per step
    for s, a, b in zip(shapes, W_n, W_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{s}: {m}")
    for a, b in zip(M_n, M_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["jordan", "polar_express"])
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("shape", [(8, 4096), (4096, 8), (16, 1000), (1000, 16), (32, 700), (64, 300)])
def test_kernel_update_is_as_accurate_as_fp32_newton_schulz(kernel, monkeypatch, method, cond, shape):
    """The kernel's orthogonalised update on ill-conditioned gradients (float64 Gram and r×r iteration)
    against the float64 Newton–Schulz reference: within 2× the error of fp32 Newton–Schulz itself (the
    same bound as the torch Gram path's accuracy test)."""
    G = matrix_with_condition(*shape, cond=cond, seed=2).float()
    W0 = torch.zeros(shape)
    W, _, calls = _train(monkeypatch, True, [W0], [[G]], [([0], dict(lr=1.0, scaling="original"))],
                         momentum=0.0, nesterov=False, ns_method=method)
    assert calls == [1]
    O = -W[0] / update_scale("original", *shape)
    exact64 = orthogonalize(G.double(), 5, method, torch.float64, gram=False)
    direct = orthogonalize(G, 5, method, F32, gram=False)
    assert _rel(O, exact64) <= _rel(direct, exact64) * 2 + 1e-6


def test_torch_path_takes_over_when_the_kernel_cannot_run(kernel, monkeypatch):
    """A non-contiguous gradient, bf16 weights or ``Muon(native=False)``: the step runs on the torch
    path (no kernel call) and is the same update."""
    torch.manual_seed(4)
    shapes = [(8, 300), (300, 8)]
    init = [torch.randn(*s) for s in shapes]
    grads = [torch.randn(*s) for s in shapes]
    groups = [([0, 1], dict(lr=0.02))]
    want, _, calls = _train(monkeypatch, True, init, [grads], groups)
    assert calls == [2]
    strided = [lambda g=g: g.t().contiguous().t() for g in grads]  # same values, column-major
    got, _, calls = _train(monkeypatch, True, init, [strided], groups)
    assert calls == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bf, _, calls = _train(monkeypatch, True, [w.bfloat16() for w in init], [[g.bfloat16() for g in grads]], groups)
    assert calls == [] and all(p.dtype == torch.bfloat16 for p in bf)
    off, _, calls = _train(monkeypatch, True, init, [grads], groups, native=False)
    assert calls == []
    for a, b in zip(off, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_planned_scratch_matches_the_kernels_own_size(kernel):
    """The memory plan's scratch estimate (no kernel loaded) is the kernel's request, to 64 B per thread."""
    for numel, threads in ((8 * 4096, 2), (11008 * 16, 1), (64 * 300, 8), (1, 1)):
        want = kernel.scratch_bytes(numel, threads)
        got = native.planned_scratch_bytes(numel, threads)
        assert 0 <= want - got <= 64 * threads, (numel, threads, want, got)


def _probe(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    code = ("import muonft_cli.native as n; k = n.thin_kernel(); "
            "print('PATH', k.path if k else None); print('STATUS', n.status()['thin'])")
    full = {k: v for k, v in os.environ.items() if k not in ("CC", "MUONFT_NATIVE", "MUONFT_NATIVE_DIR")}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=300)


def test_kernel_unavailable_or_disabled_says_why(tmp_path):
    """No compiler, a failing compiler, or ``MUONFT_NATIVE=0``: no kernel, one status line saying why,
    nothing half-written in the cache."""
    cache = tmp_path / "cache"
    for env, why in (({"CC": str(tmp_path / "no-such-cc")}, "no C compiler"),
                     ({"CC": "false"}, "failed"),
                     ({"MUONFT_NATIVE": "0"}, "disabled (MUONFT_NATIVE=0)")):
        r = _probe({**env, "MUONFT_NATIVE_DIR": str(cache)}, tmp_path)
        assert r.returncode == 0, r.stderr
        assert "PATH None" in r.stdout and why in r.stdout, (env, r.stdout)
    assert not cache.exists() or not list(cache.iterdir())


def test_concurrent_builds_share_one_cached_library(kernel, tmp_path):
    """Two processes building into an empty cache at once (torchrun ranks) both load the same library;
    no temporary file is left; a later process reuses it without rebuilding."""
    cache = tmp_path / "cache"
    env = {"MUONFT_NATIVE_DIR": str(cache)}
    code = "import muonft_cli.native as n; k = n.thin_kernel(); print('PATH', k.path if k else n.status())"
    full = {k: v for k, v in os.environ.items() if k not in ("CC", "MUONFT_NATIVE")}
    full.update(env, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=full, cwd=tmp_path)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    paths = {ln.split(" ", 1)[1] for out in outs for ln in out.splitlines() if ln.startswith("PATH")}
    assert len(paths) == 1 and all(p.returncode == 0 for p in procs), outs
    (lib,) = cache.iterdir()
    assert str(lib) in paths and lib.suffix == ".so"
    stamp = lib.stat().st_mtime_ns
    r = _probe(env, tmp_path)
    assert f"PATH {lib}" in r.stdout and lib.stat().st_mtime_ns == stamp


def test_kernel_runs_on_torchs_openmp_pool_and_any_thread_count_gives_the_same_step(kernel, monkeypatch):
    """Built with OpenMP, the kernel binds to the libgomp torch loaded (one OpenMP runtime in the process,
    so its threads are torch's own pool, not a second set fighting it for the cores); 1, 2 or 3 threads
    split the matrices differently and give bit-identical weights and momentum."""
    if kernel.threading == "OpenMP" and Path("/proc/self/maps").is_file():
        gomp = {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in ln}
        assert len(gomp) == 1, gomp
    torch.manual_seed(5)
    shapes = [(8, 700), (700, 8), (16, 300), (300, 16), (4, 90), (64, 80)]
    init = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(2)]
    groups = [(list(range(len(shapes))), dict(lr=0.02, weight_decay=0.1))]
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        runs.append(_train(monkeypatch, True, init, grads, groups)[:2])
    for W, M in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(W, runs[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(M, runs[0][1]))


def test_kernel_without_openmp_starts_its_own_threads(kernel, tmp_path):
    """A compiler that cannot link OpenMP: the kernel is built without it, says so, and its pthreads give
    the same step as the torch path."""
    cc = tmp_path / "cc-no-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && exit 1; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    code = ("import torch; import muonft_cli.native as n; from muonft_cli.optim import Muon\n"
            "k = n.thin_kernel(); print('STATUS', n.status()['thin'])\n"
            "torch.manual_seed(0); init = [torch.randn(8, 500), torch.randn(500, 8)]\n"
            "grads = [torch.randn(8, 500), torch.randn(500, 8)]\nout = []\n"
            "for native in (True, False):\n"
            "    ps = [torch.nn.Parameter(w.clone()) for w in init]\n"
            "    opt = Muon(ps, lr=0.02, ns_dtype='fp32', native=native)\n"
            "    for p, g in zip(ps, grads): p.grad = g.clone()\n"
            "    opt.step(); out.append([p.detach() for p in ps])\n"
            "    print('DONE', native, opt.native_matrices_done)\n"
            "print('CLOSE', all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*out)))\n")
    full = {k: v for k, v in os.environ.items() if k not in ("MUONFT_NATIVE",)}
    full.update(CC=str(cc), MUONFT_NATIVE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(pthreads threads)" in r.stdout and "DONE True 2" in r.stdout and "CLOSE True" in r.stdout, r.stdout


# ------------------------------------------------------------------ the Gram operator (`muonft diagnose`)


def _gram_or_skip():
    k = native.gram_kernel()
    if k is None:
        pytest.skip(f"gram kernel: {native.status()['gram']}")
    return k


@pytest.mark.parametrize("shape", [(700, 300), (300, 700), (257, 257), (33, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_kernel_matches_fp64(shape, dtype):
    """out = XᵀX·V (tall) or XXᵀ·V (wide) in fp32 from X as stored, against float64; every supported width
    (and row counts that leave a partial row group); a width it does not take is refused, nothing written."""
    k = _gram_or_skip()
    g = torch.Generator().manual_seed(7)
    X = torch.randn(*shape, generator=g).to(dtype)
    m, n = shape
    r = min(m, n)
    Xd = X.double()
    for b in (8, 16, 24, 32):
        V = torch.randn(r, b, generator=g)
        ref = Xd.T @ (Xd @ V.double()) if m >= n else Xd @ (Xd.T @ V.double())
        out = torch.full((r, b), float("nan"))
        scratch = torch.empty(k.scratch_floats(m, n, b))
        k.apply(X.data_ptr(), dtype == torch.bfloat16, m, n, V.data_ptr(), b, out.data_ptr(), scratch.data_ptr())
        assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5, (b, shape, dtype)
    out = torch.zeros(r, 12)
    with pytest.raises(ValueError, match="b must be"):
        k.apply(X.data_ptr(), dtype == torch.bfloat16, m, n, torch.zeros(r, 12).data_ptr(), 12, out.data_ptr(),
                torch.empty(k.scratch_floats(m, n, 16)).data_ptr())
    assert not out.any()


def test_gram_native_pads_and_blocks_columns():
    """diagnose's wrapper: widths that are not a multiple of 8 are zero-padded and widths past 32 split into
    blocks, each column equal to the product on its own (fp32 accuracy)."""
    from muonft_cli.diagnose.fast import _gram_native

    k = _gram_or_skip()
    g = torch.Generator().manual_seed(8)
    for shape in ((400, 150), (150, 400)):
        X = torch.randn(*shape, generator=g).bfloat16()
        Xd = X.double()
        for b in (1, 5, 40, 70):
            V = torch.randn(min(shape), b, generator=g)
            ref = Xd.T @ (Xd @ V.double()) if shape[0] >= shape[1] else Xd @ (Xd.T @ V.double())
            got = _gram_native(k, X, V)
            assert got.shape == (min(shape), b)
            assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5, (shape, b)


def test_fast_spectrum_same_with_and_without_the_gram_kernel(monkeypatch):
    """The estimate does not depend on whether the native operator ran (fp32 products either way, other
    summation order), in both precisions; MUONFT_NATIVE=0 turns it off."""
    from muonft_cli.diagnose import fast as F

    _gram_or_skip()
    g = torch.Generator().manual_seed(9)
    U, V = torch.randn(1100, 12, generator=g), torch.randn(12, 800, generator=g)
    W = (torch.randn(1100, 800, generator=g) * 0.02 + (U * torch.arange(12, 0, -1) * 0.01) @ V).bfloat16()
    for precision in ("fp32", "bf16"):
        for Wx in (W, W.t().contiguous()):
            with_k = F.fast_spectrum(Wx, precision=precision)
            with monkeypatch.context() as mp:
                mp.setattr(F, "_gram_kernel", lambda: None)
                without = F.fast_spectrum(Wx, precision=precision)
            assert with_k.stable_rank == pytest.approx(without.stable_rank, rel=1e-4), precision
            assert with_k.svd_entropy == pytest.approx(without.svd_entropy, abs=1e-4), precision
            assert with_k.matvecs == without.matvecs
    monkeypatch.setenv("MUONFT_NATIVE", "0")
    native.gram_kernel.cache_clear()
    try:
        assert native.gram_kernel() is None and native.status(build=False)["gram"].startswith("disabled")
    finally:
        monkeypatch.delenv("MUONFT_NATIVE")
        native.gram_kernel.cache_clear()


# ------------------------------------------------------ the symmetric-product mirror (Newton–Schulz on CPU)


def _mirror_or_skip():
    k = native.mirror_kernel()
    if k is None:
        pytest.skip(f"mirror kernel: {native.status()['mirror']}")
    return k


def _torch_mirror(M: torch.Tensor, s: int) -> torch.Tensor:
    out = M.clone()
    n = M.shape[-1]
    for i in range(0, n, s):
        for j in range(i + s, n, s):
            out[:, i:i + s, j:j + s] = M[:, j:j + s, i:i + s].mT
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,n,s", [(2, 1024, 128), (3, 640, 128), (1, 520, 130), (2, 36, 9), (1, 8, 8)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mirror_kernel_is_the_transposed_copy(dtype, b, n, s, threads):
    """Every block above the diagonal becomes its mirror's transpose, bit for bit; the blocks on and below
    it are untouched (tiles that fill the SSE2 registers, ragged ones — s = 130, 9 — and one block)."""
    k = _mirror_or_skip()
    M = torch.randn(b, n, n, generator=torch.Generator().manual_seed(n + s)).to(dtype)
    want = _torch_mirror(M, s)
    got = M.clone()
    k.mirror(got.data_ptr(), got.element_size(), b, n, s, threads)
    assert torch.equal(got, want)


def test_mirror_kernel_refuses_what_it_cannot_copy():
    k = _mirror_or_skip()
    M = torch.randn(1, 64, 64, dtype=torch.float64)
    before = M.clone()
    with pytest.raises(ValueError, match="element size must be 2 or 4"):
        k.mirror(M.data_ptr(), 8, 1, 64, 16, 2)
    with pytest.raises(ValueError, match="s must divide n"):
        k.mirror(M.data_ptr(), 4, 1, 64, 24, 2)
    assert torch.equal(M, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_sym_bmm_same_bits_with_and_without_the_mirror_kernel(monkeypatch, dtype):
    """`_sym_bmm`'s blocked path gives the same bits whether the native kernel or torch's copy mirrors the
    blocks (no compiler, MUONFT_NATIVE=0, fp64 — which the kernel does not take — run the latter)."""
    import importlib
    O = importlib.import_module("muonft_cli.optim.orthogonalize")
    _mirror_or_skip()
    calls = []
    real = O.mirror_kernel

    def counted():
        calls.append(1)
        return real()

    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 640, 200, generator=g).to(dtype)
    A = torch.bmm(X, X.mT) / 640
    with monkeypatch.context() as m:
        m.setattr(O, "mirror_kernel", counted)
        fast = [O._sym_bmm(X, X), O._sym_bmm(A, A, A, beta=-2.0, alpha=0.5, symmetric_r=True)]
    assert bool(calls) == (dtype != torch.float64)  # 8-byte elements go to torch's copy without asking
    with monkeypatch.context() as m:
        m.setattr(O, "mirror_kernel", lambda: None)
        slow = [O._sym_bmm(X, X), O._sym_bmm(A, A, A, beta=-2.0, alpha=0.5, symmetric_r=True)]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
