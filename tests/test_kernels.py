"""The fused GatedNorm / PreAffine-RMSNorm kernels against the torch reference (DESIGN §6).

Invariant: the Triton kernels compute the reference's function — forward and every gradient (x, λ, λ1, W_down,
W_up) — to fp32 round-off in fp32 and to bf16 round-off in bf16, on awkward shapes; every output element is
written; and a small model trains the same with the kernels as with the reference.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before import), so
sizes stay small; on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from surgeon import kernels
from surgeon.kernels import gated_norm_op, launch
from surgeon.modeling import CLASSES, SurgeonRMSNorm, gated_norm_reference, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not kernels._interpreting(),
                       reason="Triton kernels need a GPU or TRITON_INTERPRET=1"),
    # The interpreter evaluates σ(z) = 1/(1+exp(−z)) in numpy, which warns (correctly returning 0) for z ≪ 0.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

SHAPES = [(37, 48), (5, 123), (3, 7, 96)]  # rows not a multiple of any block; d not a power of two
RANKS = [8, 16, 64]
# Scale-relative tolerances: max|Δ| ≤ tol · max|reference|. fp32 is round-off; bf16 is a few bf16 ulps (the
# reference rounds n, y, a, h, g to bf16 along the way, the kernels keep fp32).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
# In bf16 the kernels must also stay as close to the exact (float64) value as bf16 storage allows.
TRUTH_TOL_BF16 = 1.5e-2


def make_params(shape, rank, pre, seed=0):
    """fp32 master values: x with an outlier column (as residual streams have), λ and λ1 away from 1, and a
    non-zero W_up so the gate matters (the identity init W_up = 0 would hide gate bugs)."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g) * 3
    x[..., 1] *= 40
    params = {
        "x": x,
        "weight": 1 + 0.3 * torch.randn(d, generator=g),
        "w_down": torch.randn(rank, d, generator=g) / d ** 0.5,
        "w_up": 0.5 * torch.randn(d, rank, generator=g),
        "pre_affine": 1 + 0.3 * torch.randn(d, generator=g) if pre else None,
    }
    return params, torch.randn(shape, generator=g)


def leaves(params, dtype, names):
    return {k: (params[k].to(DEVICE, dtype).requires_grad_() if params[k] is not None else None) for k in names}


def run(fn, params, grad_out, dtype, names):
    """Output and the gradients of every tensor argument, as float32 on the CPU."""
    args = leaves(params, dtype, names)
    out = fn(**args)
    wrt = [k for k in names if args[k] is not None]
    grads = torch.autograd.grad(out, [args[k] for k in wrt], grad_out.to(DEVICE, out.dtype))
    result = {"out": out}
    result.update({f"d{k}": g for k, g in zip(wrt, grads)})
    for k in wrt:
        assert result[f"d{k}"].dtype == args[k].dtype, f"d{k} dtype"
    return {k: v.detach().float().cpu() for k, v in result.items()}, out.dtype


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale + 1e-7, f"{what}: max|Δ| = {err:.3g} > {tol} × max|ref| = {tol * scale:.3g}"


GATED = ("x", "weight", "w_down", "w_up", "pre_affine")
PRE = ("x", "weight", "pre_affine")


def gated_triton(**kw):
    return kernels.gated_norm(eps=EPS, backend="triton", **kw)


def gated_ref(**kw):
    return gated_norm_reference(eps=EPS, **kw)


def pre_triton(**kw):
    return kernels.pre_affine_rms_norm(eps=EPS, backend="triton", **kw)


def pre_ref(**kw):
    return rms_norm_reference(eps=EPS, **kw)


def check_against_reference(kernel_fn, ref_fn, names, params, grad_out, dtype):
    got, got_dtype = run(kernel_fn, params, grad_out, dtype, names)
    want, want_dtype = run(ref_fn, params, grad_out, dtype, names)
    assert got_dtype == want_dtype
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], TOL[dtype], f"{k} ({dtype})")
    if dtype == torch.bfloat16:
        # The same bf16-rounded inputs, evaluated exactly.
        exact_inputs = {k: (v.to(dtype).double() if v is not None else None) for k, v in params.items()}
        truth, _ = run(ref_fn, exact_inputs, grad_out.to(dtype), torch.float64, names)
        for k in truth:
            assert_close(got[k], truth[k], TRUTH_TOL_BF16, f"{k} vs exact ({dtype})")


# ----------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pre", [True, False], ids=["pre", "nopre"])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_norm_matches_reference(shape, rank, pre, dtype):
    params, grad_out = make_params(shape, rank, pre)
    check_against_reference(gated_triton, gated_ref, GATED, params, grad_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pre", [True, False], ids=["pre", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pre_affine_rms_norm_matches_reference(shape, pre, dtype):
    params, grad_out = make_params(shape, 8, pre)
    check_against_reference(pre_triton, pre_ref, PRE, params, grad_out, dtype)


def test_rank_loop_with_ragged_last_chunk(monkeypatch):
    """Model widths walk the gate channels in chunks; force that on a small shape, with rank 20 in chunks of 8."""
    monkeypatch.setattr(gated_norm_op, "GATE_TILE_BUDGET", 32 * 64 * 8)
    block_m = launch.block_m_for(64, 37)
    assert gated_norm_op.block_r_for(20, block_m, 64) == 8
    params, grad_out = make_params((37, 48), 20, pre=True)
    check_against_reference(gated_triton, gated_ref, GATED, params, grad_out, torch.float32)


def test_one_row_per_program(monkeypatch):
    """At model widths (d ≥ 2048) every program gets exactly one row; force that path on a small shape."""
    monkeypatch.setattr(launch, "ROW_TILE_BUDGET", 64)
    assert launch.block_m_for(64, 37) == 1
    params, grad_out = make_params((37, 48), 16, pre=True)
    check_against_reference(gated_triton, gated_ref, GATED, params, grad_out, torch.float32)
    check_against_reference(pre_triton, pre_ref, PRE, params, grad_out, torch.float32)


def test_strided_inputs_and_empty_batch():
    d, rank = 96, 16
    params, _ = make_params((21, d), rank, pre=True)
    # x and dout as views with a row stride of 200 (slices of wider tensors): no copy needed, none made.
    wide = torch.randn(21, 200)
    wide[:, :d] = params["x"]
    gout_wide = torch.randn(21, 200)
    for fn, ref, names in ((gated_triton, gated_ref, GATED), (pre_triton, pre_ref, PRE)):
        outs, grads = [], []
        for f in (fn, ref):
            args = leaves(params, torch.float32, names)
            x_base = wide.clone().to(DEVICE).requires_grad_()
            args["x"] = x_base[:, :d]
            out = f(**args)
            out.backward(gout_wide.to(DEVICE)[:, :d])
            outs.append(out.detach().cpu())
            grads.append([x_base.grad.cpu()] + [args[k].grad.cpu() for k in names[1:]])
        assert_close(outs[0], outs[1], 1e-5, "strided out")
        for g, w in zip(*grads):
            assert_close(g, w, 1e-5, "strided grad")
    # No rows at all: empty output, zero parameter gradients.
    params, grad_out = make_params((0, d), rank, pre=True)
    got, _ = run(gated_triton, params, grad_out, torch.float32, GATED)
    assert got["out"].shape == (0, d) and got["dx"].shape == (0, d)
    assert all(not got[k].any() for k in ("dweight", "dw_down", "dw_up", "dpre_affine"))
    got, _ = run(pre_triton, params, grad_out, torch.float32, PRE)
    assert got["out"].shape == (0, d) and not got["dweight"].any() and not got["dpre_affine"].any()


def test_frozen_base_trains_only_the_gates():
    """DESIGN §7's warm-up: λ, λ1 and the input frozen, only W_down and W_up learn."""
    params, grad_out = make_params((37, 48), 16, pre=True)
    grads = []
    for fn in (gated_triton, gated_ref):
        args = {k: v.to(DEVICE).clone() for k, v in params.items()}
        args["w_down"].requires_grad_()
        args["w_up"].requires_grad_()
        fn(**args).backward(grad_out.to(DEVICE))
        assert all(args[k].grad is None for k in ("x", "weight", "pre_affine"))
        grads.append((args["w_down"].grad.cpu(), args["w_up"].grad.cpu()))
    for got, want in zip(*grads):
        assert_close(got, want, 1e-5, "gate grads with a frozen base")


# ----------------------------------------------------------------------------- every element written


def test_poisoned_buffers_are_fully_written(monkeypatch):
    """Every buffer the kernels allocate (outputs, rstd, a, da, c, dx, per-program partials) starts as NaN or a
    sentinel; a single unwritten element would show up as a NaN in the results. 5 rows over 4 backward programs
    leaves one program with no rows, whose partials must still be written (as zeros)."""
    real_empty = torch.empty
    allocated = []

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype != torch.bool:
            t.fill_(float("nan") if t.is_floating_point() else -7777)
        allocated.append(tuple(t.shape))
        return t

    cases = [((5, 123), 8), ((37, 48), 16), ((3, 7, 96), 64)]
    wants = {}
    for shape, rank in cases:
        params, grad_out = make_params(shape, rank, pre=True)
        wants[shape] = (run(gated_ref, params, grad_out, torch.float32, GATED)[0],
                        run(pre_ref, params, grad_out, torch.float32, PRE)[0])
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for shape, rank in cases:
        params, grad_out = make_params(shape, rank, pre=True)
        for (fn, names), want in zip(((gated_triton, GATED), (pre_triton, PRE)), wants[shape]):
            got, _ = run(fn, params, grad_out, torch.float32, names)
            for k in want:
                assert_close(got[k], want[k], TOL[torch.float32], f"{k} {shape} (poisoned)")
    assert len(allocated) >= 10, "the poisoned allocator was not used"


# ----------------------------------------------------------------------------- the reference itself


def test_reference_gradcheck_float64():
    """The reference's own gradients (which the kernels are compared with) against finite differences, at
    gradcheck's default tolerances: the reference keeps float64 inputs in float64."""
    g = torch.Generator().manual_seed(3)
    d, rank = 12, 4

    def p(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    x, w, wd, wu, pre = p(3, 2, d, scale=2), p(d, scale=0.3, offset=1), p(rank, d, scale=0.3), p(d, rank, scale=0.5), \
        p(d, scale=0.3, offset=1)
    check = {}
    assert torch.autograd.gradcheck(lambda *a: gated_norm_reference(*a[:4], EPS, pre_affine=a[4]), (x, w, wd, wu, pre),
                                    **check)
    assert torch.autograd.gradcheck(lambda *a: gated_norm_reference(*a, EPS), (x, w, wd, wu), **check)
    assert torch.autograd.gradcheck(lambda *a: rms_norm_reference(a[0], a[1], EPS, pre_affine=a[2]), (x, w, pre),
                                    **check)


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def restore_backend(monkeypatch):
    monkeypatch.setattr(kernels, "_global_default", kernels.get_backend())


def test_backend_names_are_checked(restore_backend):
    params, _ = make_params((4, 16), 8, pre=True)
    args = {k: v for k, v in params.items()}
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.gated_norm(**args, eps=EPS, backend="cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.pre_affine_rms_norm(args["x"], args["weight"], args["pre_affine"], EPS, backend="Triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.use_backend("fast")
    assert kernels.get_backend() == "auto"


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU meaning of 'auto'")
def test_auto_dispatch_and_use_backend(restore_backend):
    params, _ = make_params((9, 48), 16, pre=True)
    args = dict(params, eps=EPS)
    ref = gated_norm_reference(**args)
    tri = kernels.gated_norm(**args, backend="triton")
    assert not torch.equal(ref, tri), "reference and kernel should differ in round-off, or this test proves nothing"
    assert torch.equal(kernels.gated_norm(**args), ref)                   # auto on CPU: the plain reference
    with kernels.use_backend("triton") as ctx:                            # context manager form
        assert ctx.backend == "triton" and kernels.get_backend() == "triton"
        assert torch.equal(kernels.gated_norm(**args), tri)
        assert torch.equal(kernels.gated_norm(**args, backend="torch"), ref)   # an explicit choice wins
        with kernels.use_backend("torch"):
            assert torch.equal(kernels.gated_norm(**args), ref)
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "auto"
    kernels.use_backend("triton")                                          # setter form
    assert torch.equal(kernels.gated_norm(**args), tri)
    pre_tri = kernels.pre_affine_rms_norm(params["x"], params["weight"], params["pre_affine"], EPS)
    assert torch.equal(pre_tri, kernels.pre_affine_rms_norm(params["x"], params["weight"], params["pre_affine"], EPS,
                                                            backend="triton"))


def test_surgeon_norm_module_runs_the_kernels(restore_backend):
    torch.manual_seed(0)
    norm = SurgeonRMSNorm(48, eps=EPS, gate_rank=16, pre_affine=True).to(DEVICE)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 11, 48, device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        norm.zero_grad()
        with kernels.use_backend(backend):
            out = norm(x)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in norm.parameters()])
    for got, want in zip(results[1], results[0]):
        assert_close(got.cpu(), want.cpu(), 1e-5, "module")


def test_compile_backend_matches_reference():
    params, grad_out = make_params((37, 48), 16, pre=True)

    def compiled(**kw):
        return kernels.gated_norm(eps=EPS, backend="compile", **kw)

    check_against_reference(compiled, gated_ref, GATED, params, grad_out, torch.float32)


# ----------------------------------------------------------------------------- convergence


def train_losses(backend, steps=30):
    cfg_cls, model_cls = CLASSES["llama"]
    torch.manual_seed(0)
    cfg = cfg_cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
        surgeon={"gated_norm": {"rank": 16, "targets": ["model.layers.*.input_layernorm",
                                                        "model.layers.*.post_attention_layernorm", "model.norm"]},
                 "pre_affine": {"targets": ["model.layers.*.input_layernorm"]}},
    )
    model = model_cls(cfg).to(DEVICE)
    data = torch.randint(0, cfg.vocab_size, (4, 2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with kernels.use_backend(backend):
        for step in range(steps):
            batch = data[step % len(data)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def test_convergence_tiny_llama_kernels_vs_reference(monkeypatch, restore_backend):
    """Liger's convergence test: the same model, seed and data, trained with the kernels and with the reference;
    the loss curves must agree to round-off and go down."""
    calls = []
    real = kernels.gated_norm_triton
    monkeypatch.setattr(kernels, "gated_norm_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = train_losses("torch")
    assert not calls
    fused = train_losses("triton")
    assert len(calls) == 30 * 5, "every gated norm (2 layers × 2 + final) should run the kernels on every step"
    diffs = [abs(a - b) for a, b in zip(fused, reference)]
    assert max(diffs) < 1e-3, f"loss curves diverge: max |Δ| = {max(diffs):.3g}"
    assert reference[-1] < reference[0] - 1.0 and fused[-1] < fused[0] - 1.0, f"loss did not go down: {fused}"
