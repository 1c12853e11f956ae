"""The solves on Hopper thread-block clusters (deqkern.ops.persistent_cluster, CUDA C++),
forward and adjoint, against the eager twins and float64 references, at every cluster shape
the kernels have for each width (the forward's forced through ``DEQKERN_CLUSTER_CONFIG``),
with the same row state, rstd and host check as the Triton kernels. Needs the built
extension and an sm_90 GPU; on a CPU only the dispatch is checked."""

import pytest
import torch

import deqkern
from deqkern.ops import persistent, persistent_adjoint, persistent_cluster, persistent_split
from deqkern.solver.loop import check_vector, host_check
from deqkern.solver.report import read_check
from numerics import case_seed
from test_ops_persistent import (DAMPING, EPS, TOL, assert_adjoint_outputs, assert_graph_replays, assert_rows_close,
                                 assert_same_steps, fixed_point64, make_cell, row_err)

needs_cluster = pytest.mark.skipif(
    not (torch.cuda.is_available() and persistent_cluster.available(torch.device("cuda", 0))),
    reason="needs deqkern._cluster and an sm_90+ GPU")

#: The dtypes the kernel takes (float32 stays on the Triton kernels).
DTYPES = [torch.bfloat16, torch.float16]
#: (rows, d, stop mode) and the cluster shapes (C, BM) the kernel has at that width: d / C
#: in (32, 64, 128) columns per CTA; rows past the last full block; C not a power of two.
CASES = [(21, 64, "rel"), (257, 96, "abs"), (300, 512, "max"), (40, 256, "rel")]


def force(monkeypatch, n_rows, d, dtype, shape):
    """Make the kernel use cluster shape ``shape``, or skip where the GPU cannot hold it."""
    if persistent_cluster.cluster_config(n_rows, d, dtype, 0, shape) is None:
        pytest.skip(f"the GPU holds no cluster {shape} at d={d} ({dtype})")
    monkeypatch.setenv("DEQKERN_CLUSTER_CONFIG", f"{shape[0]},{shape[1]}")


@needs_cluster
@pytest.mark.parametrize("n_rows,d,stop_mode,shape",
                         [(n, d, m, s) for n, d, m in CASES for s in persistent_cluster.shapes(d)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_parity(monkeypatch, dtype, n_rows, d, stop_mode, shape):
    gen = torch.Generator().manual_seed(case_seed("cluster", dtype, n_rows, d))
    f64, cast = make_cell(n_rows, d, dtype, gen, device="cuda")
    force(monkeypatch, n_rows, d, dtype, shape)
    tol = TOL[dtype] * (d**0.5 if stop_mode == "abs" else 1.0)  # an absolute residual grows with ||h|| ~ sqrt(d)
    assert persistent_cluster.cluster_for(*cast) == shape
    h, state, rstd, parts = persistent_cluster.solve_cluster(*cast, EPS, DAMPING, 40, tol, stop_mode, True, shape)
    h_e, state_e, rstd_e, _ = persistent.solve_reference(*cast, EPS, DAMPING, 40, tol, stop_mode, True)
    assert h.dtype == dtype and h.shape == (n_rows, d)
    assert bool((state.residual < tol).all())
    assert len(set(state.nstep.tolist())) >= 2, "rows should converge at different iterations"
    assert bool((state.lowest <= state.residual).all()) and bool((state.prev > state.residual).all())
    assert_same_steps(state.nstep, state_e.nstep)
    assert_rows_close(h, h_e, fixed_point64(*f64), dtype, "h_star")
    # rstd of the returned iterate's z, against float64 at that iterate
    z64 = h.double() @ f64[0].T + f64[1]
    torch.testing.assert_close(rstd.double(), torch.rsqrt(z64.pow(2).mean(-1) + EPS), rtol=1e-5, atol=0)
    check, iterations = read_check(parts)
    assert check == host_check(check_vector(state, tol)) and iterations == int(state.nstep.max())


@needs_cluster
def test_nonfinite_row_max_iter_and_broadcast_frozen():
    """A NaN row freezes at step 1 with a NaN residual, rows that cannot converge stop at
    max_iter with the eager twin's steps; a (d,) frozen vector broadcasts (stride 0)."""
    gen = torch.Generator().manual_seed(case_seed("cluster-nan"))
    f64, (w, frozen, gain, h0) = make_cell(37, 64, torch.bfloat16, gen, device="cuda")
    frozen[4, 3] = float("nan")
    config = persistent_cluster.cluster_for(w, frozen, gain, h0)
    h, state, _, parts = persistent_cluster.solve_cluster(w, frozen, gain, h0, EPS, DAMPING, 6, 1e-7, "rel", False,
                                                          config)
    h_e, state_e, _, _ = persistent.solve_reference(w, frozen, gain, h0, EPS, DAMPING, 6, 1e-7, "rel", False)
    assert state.nstep[4] == 1 and torch.isnan(state.residual[4]) and torch.isnan(h[4]).all()
    others = torch.arange(37, device="cuda") != 4
    assert bool((state.nstep[others] == 6).all()) and torch.equal(state.nstep, state_e.nstep)
    assert bool((state.residual[others] >= 1e-7).all()) and bool(torch.isfinite(h[others]).all())
    check, iterations = read_check(parts)
    assert (check.unconverged, check.first_bad_iter, check.bad_rows) == (37, 1, 1) and iterations == 6

    w64, frozen64, gain64, h64 = f64
    tol = TOL[torch.bfloat16]
    h, state, _, _ = persistent_cluster.solve_cluster(w, frozen[7].clone(), gain, h0, EPS, DAMPING, 40, tol, "rel",
                                                      False, config)
    h_e, _, _, _ = persistent.solve_reference(w, frozen[7].clone(), gain, h0, EPS, DAMPING, 40, tol, "rel", False)
    assert bool((state.residual < tol).all())
    assert_rows_close(h, h_e, fixed_point64(w64, frozen64[7], gain64, h64), torch.bfloat16, "h_star")


@needs_cluster
def test_captured_in_a_cuda_graph():
    """No host sync inside the launch: it records in a CUDA graph and replays to the same result."""
    gen = torch.Generator().manual_seed(case_seed("cluster-graph"))
    _, cast = make_cell(256, 512, torch.bfloat16, gen, device="cuda")
    assert_graph_replays(persistent_cluster.solve_cluster,
                         (*cast, EPS, DAMPING, 20, 2e-2, "rel", True, persistent_cluster.cluster_for(*cast)))


@needs_cluster
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solve_cell_takes_it_and_matches_the_split_kernel(monkeypatch, dtype):
    """``solve_cell`` runs its forward and its adjoint on the cluster kernels where they fit:
    h* and the gradients agree with the split kernels'."""
    gen = torch.Generator().manual_seed(case_seed("cluster-cell", dtype))
    _, (w, frozen, gain, h0) = make_cell(256, 512, dtype, gen, device="cuda")
    tol = TOL[dtype]
    out = {}
    for kernel in ("auto", "split"):
        monkeypatch.setattr(persistent_split, "KERNEL", kernel)
        params = [t.clone().requires_grad_() for t in (w, frozen, gain)]
        h, info = deqkern.solve_cell(*params, h0, damping=DAMPING, eps=EPS, tol=tol, max_iter=40)
        backend = deqkern.last_backend()
        h.float().pow(2).sum().backward()
        out[kernel] = (h, info["nstep"], [p.grad for p in params], (backend, deqkern.last_backend()))
    assert out["auto"][3] == (persistent_cluster.BACKEND,) * 2 and out["split"][3] == ("triton-persistent",) * 2
    assert_same_steps(out["auto"][1], out["split"][1])
    for got, expected in zip([out["auto"][0], *out["auto"][2]], [out["split"][0], *out["split"][2]]):
        err = float((got.double() - expected.double()).norm() / expected.double().norm())
        assert err <= 5 * tol, (got.shape, err)


@needs_cluster
def test_what_it_does_not_take(monkeypatch):
    """float32, widths without a tile, mixed dtypes, unaligned rows and the Triton kernels
    asked for by name go to the Triton kernels."""
    gen = torch.Generator().manual_seed(case_seed("cluster-no"))
    _, (w, frozen, gain, h0) = make_cell(64, 96, torch.bfloat16, gen, device="cuda")
    assert persistent_cluster.cluster_for(w, frozen, gain, h0) == (3, 16)
    _, odd = make_cell(64, 100, torch.bfloat16, gen, device="cuda")
    assert persistent_cluster.cluster_for(*odd) is None
    assert persistent_cluster.cluster_for(w, frozen.float(), gain, h0) is None
    assert persistent_cluster.cluster_for(w.float(), frozen.float(), gain.float(), h0.float()) is None
    shifted = torch.empty(64 * 96 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(64, 96)
    assert persistent_cluster.cluster_for(w, frozen, gain, shifted.copy_(h0)) is None
    monkeypatch.setattr(persistent_split, "KERNEL", "split")
    assert persistent_cluster.cluster_for(w, frozen, gain, h0) is None
    assert persistent_cluster.adjoint_for(w, frozen, gain, h0) is None


@needs_cluster
def test_adjoint_not_taken_past_its_widths():
    """The adjoint keeps whole rows of g, v and n in registers: up to d = 512; wider rows (the
    forward may still take them) and float32 go to the Triton adjoint."""
    gen = torch.Generator().manual_seed(case_seed("cluster-adj-no"))
    _, wide = make_cell(64, 640, torch.bfloat16, gen, device="cuda")
    assert persistent_cluster.adjoint_shapes(640) == [] and persistent_cluster.adjoint_for(*wide) is None
    _, cast = make_cell(64, 512, torch.bfloat16, gen, device="cuda")
    assert persistent_cluster.adjoint_for(*cast) == (4, 16)
    assert persistent_cluster.adjoint_for(*(t.float() for t in cast)) is None


#: (rows, d) for the adjoint: rows past the last full block, C not a power of two, one row.
ADJOINT_CASES = [(21, 64), (257, 96), (300, 512), (40, 256), (1, 128)]


@needs_cluster
@pytest.mark.parametrize("n_rows,d,shape", [(n, d, s) for n, d in ADJOINT_CASES
                                            for s in persistent_cluster.adjoint_shapes(d)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adjoint_parity(dtype, n_rows, d, shape):
    """g against the eager twin and a float64 solve, for gradients from 1e-3 to 1e3 per row
    (v in h*'s dtype for one half of the cases, float32 for the other); dz, rstd and d_gain
    at the returned g against float64; the row state and host check as the twin's."""
    gen = torch.Generator().manual_seed(case_seed("cluster-adj", dtype, n_rows, d))
    f64, cast = make_cell(n_rows, d, dtype, gen, device="cuda")
    if persistent_cluster.adjoint_config(n_rows, d, dtype, 0, shape) is None:
        pytest.skip(f"the GPU holds no adjoint cluster {shape} at d={d} ({dtype})")
    w64, frozen64, gain64, _ = f64
    h_star = fixed_point64(*f64).to(dtype)
    v = torch.randn(n_rows, d, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, n_rows)[:, None]
    v = v.to(device="cuda", dtype=torch.float32 if (n_rows + d) % 2 else dtype)
    args = (cast[0], cast[1], cast[2], h_star, v, EPS, DAMPING, 30, TOL[dtype])
    g, state, dz, rstd, d_gain, parts, d_gain_cast = persistent_cluster.adjoint_cluster(*args, shape)
    g_e, state_e = persistent_adjoint.adjoint_reference(*args)[:2]
    g64, state64 = persistent_adjoint.adjoint_reference(w64, frozen64, gain64, h_star.double(), v.double(), EPS,
                                                        DAMPING, 400, 1e-14)[:2]
    assert bool((state64.residual < 1e-14).all())

    assert g.dtype == torch.float32 and dz.dtype == dtype and g.shape == dz.shape == (n_rows, d)
    assert bool((state.residual < TOL[dtype]).all())
    assert_same_steps(state.nstep, state_e.nstep)
    assert bool((state.lowest <= state.residual).all())
    assert_rows_close(g, g_e, g64, dtype, "g")
    assert_adjoint_outputs(g, dz, rstd, d_gain, h_star, f64, dtype)
    assert d_gain.dtype == torch.float32 and torch.equal(d_gain_cast, d_gain.to(dtype))  # rounded to nearest
    check, iterations = read_check(parts)
    assert parts.shape == (-(-n_rows // 16), 5)
    assert check == host_check(check_vector(state, TOL[dtype])) and iterations == int(state.nstep.max())


@needs_cluster
def test_adjoint_nonfinite_row_max_iter_and_broadcast_frozen():
    """An Inf in v freezes its row at step 1 with a NaN residual; rows that cannot reach tol
    stop at max_iter with the eager twin's steps; a (d,) frozen vector broadcasts."""
    gen = torch.Generator().manual_seed(case_seed("cluster-adj-nan"))
    f64, (w, frozen, gain, h0) = make_cell(37, 64, torch.bfloat16, gen, device="cuda")
    h_star = fixed_point64(*f64).to(torch.bfloat16)
    v = torch.randn(37, 64, generator=gen).to("cuda")
    v[7, 0] = float("inf")
    config = persistent_cluster.adjoint_for(w, frozen, gain, h_star)
    out = persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 4, 1e-9, config)
    ref = persistent_adjoint.adjoint_reference(w, frozen, gain, h_star, v, EPS, DAMPING, 4, 1e-9)
    assert out.state.nstep[7] == 1 and torch.isnan(out.state.residual[7])
    assert torch.equal(out.state.nstep, ref.state.nstep)
    others = torch.arange(37, device="cuda") != 7
    assert bool((out.state.nstep[others] == 4).all()) and bool(torch.isfinite(out.g[others]).all())
    check, iterations = read_check(out.check)
    assert (check.unconverged, check.first_bad_iter, check.bad_rows) == (37, 1, 1) and iterations == 4

    v[7, 0] = 1.0
    out = persistent_cluster.adjoint_cluster(w, frozen[3].clone(), gain, h_star, v, EPS, DAMPING, 40,
                                             TOL[torch.bfloat16], config)
    ref = persistent_adjoint.adjoint_reference(w, frozen[3].clone(), gain, h_star, v, EPS, DAMPING, 400, 1e-12)
    assert bool((out.state.residual < TOL[torch.bfloat16]).all())
    assert float(row_err(out.g, ref.g.double()).max()) < 5 * TOL[torch.bfloat16]


@needs_cluster
def test_adjoint_d_gain_from_the_last_cluster_and_counters_left_at_zero():
    """The last cluster to finish sums d_gain's parts in block order: launches give the same
    bits, on the default stream and on another, and leave their streams' counters at zero."""
    gen = torch.Generator().manual_seed(case_seed("cluster-adj-count"))
    f64, (w, frozen, gain, _) = make_cell(300, 256, torch.bfloat16, gen, device="cuda")
    h_star = fixed_point64(*f64).to(torch.bfloat16)
    v = torch.randn(300, 256, generator=gen).to("cuda", torch.bfloat16)
    config = persistent_cluster.adjoint_for(w, frozen, gain, h_star)
    outs = [persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 30, 1e-3, config)
            for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs.append(persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 30, 1e-3, config))
    torch.cuda.synchronize()
    blocks = -(-300 // persistent_cluster.ADJOINT_ROWS)
    for out in outs:  # the float32 parts (blocks, d) end where d_gain starts; summed in block order here
        at = out.d_gain.storage_offset()
        parts = out.d_gain._base[at - blocks * 256:at].view(blocks, 256)
        expected = parts[0].clone()
        for b in range(1, blocks):
            expected += parts[b]
        assert torch.equal(out.d_gain, expected) and torch.equal(out.d_gain_cast, expected.to(torch.bfloat16))
        assert torch.equal(out.d_gain, outs[0].d_gain)  # and the parts are sums in row order: the same bits
    assert len(persistent_cluster._COUNTERS) >= 2
    assert all(int(c.abs().sum()) == 0 for c in persistent_cluster._COUNTERS.values())


@needs_cluster
def test_adjoint_captured_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(case_seed("cluster-adj-graph"))
    f64, cast = make_cell(256, 512, torch.bfloat16, gen, device="cuda")
    h_star = fixed_point64(*f64).to(torch.bfloat16)
    v = torch.randn(256, 512, generator=gen).to("cuda", torch.bfloat16)
    assert_graph_replays(persistent_cluster.adjoint_cluster,
                         (cast[0], cast[1], cast[2], h_star, v, EPS, DAMPING, 20, 2e-2,
                          persistent_cluster.adjoint_for(cast[0], cast[1], cast[2], h_star)))


def test_cpu_tensors_never_take_it(monkeypatch):
    """CPU tensors never take the kernels; a malformed forced configuration is a ValueError naming the variable."""
    _, cast = make_cell(8, 64, torch.float32, torch.Generator().manual_seed(0))
    assert persistent_cluster.cluster_for(*cast) is None and persistent_cluster.adjoint_for(*cast) is None
    _, half = make_cell(8, 64, torch.bfloat16, torch.Generator().manual_seed(0))
    assert persistent_cluster.adjoint_for(*half) is None
    monkeypatch.setenv("DEQKERN_CLUSTER_CONFIG", "8;16")
    with pytest.raises(ValueError, match="DEQKERN_CLUSTER_CONFIG must be 'C,BM'.*'8;16'"):
        persistent_cluster.forced_config()


@needs_cluster
def test_compiled_backward_takes_the_cluster_adjoint():
    """Under torch.compile the registered backward (the adjoint custom op) runs the cluster
    adjoint too, with the eager path's gradients."""
    gen = torch.Generator().manual_seed(case_seed("cluster-adj-compile"))
    _, (w, frozen, gain, h0) = make_cell(64, 128, torch.bfloat16, gen, device="cuda")

    def loss(w, frozen, gain, h0):
        h, _ = deqkern.solve_cell(w, frozen, gain, h0, damping=DAMPING, eps=EPS, tol=2e-2, max_iter=40,
                                  on_nonconvergence="ignore")
        return h.float().pow(2).sum()

    grads = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, fullgraph=True, backend="aot_eager"))):
        params = [t.clone().requires_grad_() for t in (w, frozen, gain)]
        fn(*params, h0).backward()
        assert deqkern.last_backend() == persistent_cluster.BACKEND, name
        grads[name] = [p.grad.double() for p in params]
    for got, expected in zip(grads["compiled"], grads["eager"]):
        assert float((got - expected).norm() / expected.norm()) <= 1e-2
