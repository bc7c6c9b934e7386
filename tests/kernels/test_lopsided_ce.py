"""Fused lopsided linear cross entropy vs the plain torch reference (kernels.weighted_ce_reference), gradients included.

Both backends run here: the torch chunked path, and the Triton kernels in the CPU interpreter
(TRITON_INTERPRET=1, small shapes).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import lopsided_ce
from tests.helpers import assert_compiles_for_hopper, interpreted_triton_module
from trainer.model.loss import group_counts, lopsided_token_weights
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def interpreted_triton():
    """The Triton module in the CPU interpreter, with a tiny vocabulary block (several blocks and a masked tail)."""
    with interpreted_triton_module("lopsided_ce_triton", MAX_BLOCK_V=16) as module:
        yield module


def make_case(
    n_tokens: int = 29,
    hidden: int = 8,
    vocab: int = 50,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    groups: torch.Tensor | None = None,
    alpha: float = 0.7,
    scale: float = 1.0,
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        groups = torch.randint(0, 3, (n_tokens,), generator=gen)
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    targets[groups == 0] = IGNORE_INDEX
    n_j, n_i = group_counts(groups)
    return {
        "hidden": (torch.randn(n_tokens, hidden, generator=gen) * scale).to(dtype),
        "weight": (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype),
        "bias": (torch.randn(vocab, generator=gen) * 0.1).to(dtype) if bias else None,
        "targets": targets,
        "token_weights": lopsided_token_weights(groups, alpha, n_j, n_i),
        "groups": groups,
    }


def trainer_reference(hidden, weight, targets, token_weights, groups, bias=None):
    """The slice's reference: full logits through the head, then kernels.weighted_ce_reference."""
    return kernels.weighted_ce_reference(F.linear(hidden, weight, bias), targets, token_weights, groups)


def run(fn, case: dict, grad_scale: float = 1.0, **kwargs):
    """Losses and the gradients of ``grad_scale * total`` w.r.t. hidden, weight, bias."""
    leaves = {
        k: case[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias") if case[k] is not None
    }
    out = fn(
        leaves["hidden"],
        leaves["weight"],
        case["targets"],
        case["token_weights"],
        case["groups"],
        bias=leaves.get("bias"),
        **kwargs,
    )
    (out.total * grad_scale).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    return [t.detach() for t in out], grads


def assert_matches(case: dict, backend: str, rtol: float = 1e-5, atol: float = 1e-6, **kwargs) -> None:
    ref_losses, ref_grads = run(trainer_reference, case, grad_scale=1.7)
    losses, grads = run(kernels.fused_linear_lopsided_ce, case, grad_scale=1.7, backend=backend, **kwargs)
    for name, got, want in zip(("total", "judgment", "interpretation"), losses, ref_losses):
        assert got.dtype == torch.float32 and got.dim() == 0, name
        torch.testing.assert_close(got, want.float(), rtol=rtol, atol=atol, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        assert grads[name] is not None and grads[name].dtype == want.dtype, name
        torch.testing.assert_close(grads[name].float(), want.float(), rtol=rtol, atol=atol, msg=f"grad {name}")


def test_the_reference_is_the_weighted_token_cross_entropy() -> None:
    """The one reference, against the formula written out token by token: sum_t w_t * -log softmax(h_t W^T + b)[y_t]."""
    case = make_case()
    got = kernels.lopsided_ce_reference(**case)
    logits = (case["hidden"].double() @ case["weight"].double().T + case["bias"].double()).tolist()
    parts = {JUDGMENT: 0.0, INTERPRETATION: 0.0}
    for row, y, w, g in zip(logits, case["targets"].tolist(), case["token_weights"].tolist(), case["groups"].tolist()):
        if y == IGNORE_INDEX or g not in parts:
            continue
        top = max(row)
        parts[g] += w * (top + math.log(sum(math.exp(x - top) for x in row)) - row[y])
    want = (parts[JUDGMENT] + parts[INTERPRETATION], parts[JUDGMENT], parts[INTERPRETATION])
    for a, b in zip(got, want):
        assert abs(float(a) - b) <= 1e-5 * max(1.0, abs(b)), (float(a), b)


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_matches_reference(backend: str, chunk_size) -> None:
    # V=50 is not a multiple of the (test) vocabulary block of 16, nor T=29 of the chunks.
    assert_matches(make_case(), backend, chunk_size=chunk_size)


def test_no_bias(backend: str) -> None:
    assert_matches(make_case(bias=False), backend, chunk_size=6)


def test_single_token(backend: str) -> None:
    assert_matches(make_case(n_tokens=1, groups=torch.tensor([JUDGMENT])), backend)


def test_all_rows_ignored(backend: str) -> None:
    case = make_case(groups=torch.zeros(9, dtype=torch.long), n_tokens=9)
    assert_matches(case, backend)
    losses, grads = run(kernels.fused_linear_lopsided_ce, case, backend=backend)
    assert all(float(t) == 0.0 for t in losses)
    # zero gradients, not missing ones: under ZeRO-3 every rank must produce a gradient
    assert all(g is not None and not g.any() for g in grads.values())


@pytest.mark.parametrize("fp16", [False, True])
def test_given_rows_read_nothing_back_and_match(backend: str, fp16: bool) -> None:
    """``rows=`` (the collate's supervised rows): the same losses and gradients, with no scalar read or nonzero."""
    from tests.trainer.training.test_no_host_sync import SyncCounter

    case = make_case(dtype=torch.float16 if fp16 else torch.float32)
    rows = ((case["targets"] != IGNORE_INDEX) & (case["groups"] > 0)).nonzero().squeeze(1)
    with SyncCounter() as counter:
        got = run(kernels.fused_linear_lopsided_ce, case, backend=backend, chunk_size=4, rows=rows)
    assert counter.seen == {}
    want = run(kernels.fused_linear_lopsided_ce, case, backend=backend, chunk_size=4)
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0)


def test_all_rows_supervised(backend: str) -> None:
    groups = torch.full((12,), INTERPRETATION)
    groups[0] = JUDGMENT
    assert_matches(make_case(n_tokens=12, groups=groups), backend, chunk_size=5)


def test_no_interpretation_tokens(backend: str) -> None:
    groups = torch.tensor([0, 0, 1, 0, 1, 0, 0, 1])
    case = make_case(n_tokens=8, groups=groups)
    assert_matches(case, backend)
    losses, _ = run(kernels.fused_linear_lopsided_ce, case, backend=backend)
    assert float(losses[2]) == 0.0 and float(losses[1]) > 0


def test_no_judgment_tokens(backend: str) -> None:
    groups = torch.tensor([0, 2, 2, 0, 2, 2, 2, 0, 0])
    case = make_case(n_tokens=9, groups=groups)
    assert_matches(case, backend)
    losses, _ = run(kernels.fused_linear_lopsided_ce, case, backend=backend)
    assert float(losses[1]) == 0.0 and float(losses[2]) > 0


def test_bf16(backend: str) -> None:
    # Against the reference on the same bf16 inputs (bf16 logits upcast to fp32, as transformers
    # does); gradients are bf16 on both sides.
    case = make_case(n_tokens=40, hidden=16, vocab=70, dtype=torch.bfloat16)
    assert_matches(case, backend, rtol=2e-2, atol=2e-3, chunk_size=16)


def test_fp16_loss_scaled_gradients_do_not_underflow(backend: str) -> None:
    """fp16 gradients are computed in backward, after the loss scale: with tiny token weights the
    unscaled gradient (~1e-9) would flush to zero in fp16, the scaled one must not."""
    case = make_case(n_tokens=24, hidden=16, vocab=40, dtype=torch.float16)
    case["token_weights"] = case["token_weights"] * 1e-6
    loss_scale = 2.0**16
    ref_losses, ref_grads = run(trainer_reference, case, grad_scale=loss_scale)
    losses, grads = run(kernels.fused_linear_lopsided_ce, case, grad_scale=loss_scale, backend=backend, chunk_size=10)
    assert ref_grads["weight"].abs().max() > 0
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-9)
    for name, want in ref_grads.items():
        assert grads[name].dtype == torch.float16
        torch.testing.assert_close(grads[name].float(), want.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_very_large_logits(backend: str) -> None:
    case = make_case(scale=2000.0)  # logits in the thousands: exp() would overflow without the max shift
    ref_losses, _ = run(trainer_reference, case)
    assert float(ref_losses[0]) > 100
    assert_matches(case, backend, rtol=1e-5, atol=1e-3)


def test_weights_not_zero_one(backend: str) -> None:
    case = make_case(seed=3)
    gen = torch.Generator().manual_seed(7)
    case["token_weights"] = torch.rand(case["groups"].shape, generator=gen) * 3.0
    case["token_weights"][::4] = 0.0
    assert_matches(case, backend, chunk_size=5)


def test_unsupervised_group_with_weight_is_not_counted(backend: str) -> None:
    # As in trainer.model.loss: total = judgment + interpretation, so a group-0 token with a valid target
    # and a weight contributes nothing (and gets no gradient).
    case = make_case()
    case["targets"] = torch.randint(0, 50, case["targets"].shape)
    case["token_weights"] = torch.ones_like(case["token_weights"])
    assert_matches(case, backend)


@pytest.mark.parametrize("all_supervised", [False, True])  # True: dh chunks are written in place
def test_strided_inputs(backend: str, all_supervised: bool) -> None:
    case = make_case(groups=torch.full((29,), INTERPRETATION) if all_supervised else None)
    for name in ("hidden", "weight"):
        case[name] = case[name].t().contiguous().t()  # same values, column-major
        assert not case[name].is_contiguous()
    assert_matches(case, backend, chunk_size=6)


def test_part_gradients(backend: str) -> None:
    """Gradients flowing into the judgment/interpretation outputs take the recompute path."""
    case = make_case()

    def combo(fn, **kw):
        leaves = [case[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        out = fn(leaves[0], leaves[1], case["targets"], case["token_weights"], case["groups"], bias=leaves[2], **kw)
        (0.5 * out.total + 2.0 * out.judgment - 3.0 * out.interpretation).backward()
        return [t.grad for t in leaves]

    for got, want in zip(
        combo(kernels.fused_linear_lopsided_ce, backend=backend, chunk_size=8), combo(trainer_reference)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_grad_forward(backend: str) -> None:
    case = make_case()
    with torch.no_grad():
        got = kernels.fused_linear_lopsided_ce(**case, backend=backend)
        want = trainer_reference(**case)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_double_backward_raises() -> None:
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_(True)
    out = kernels.fused_linear_lopsided_ce(
        hidden, case["weight"], case["targets"], case["token_weights"], case["groups"]
    )
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.total.backward()


def test_only_hidden_requires_grad() -> None:
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_(True)
    out = kernels.fused_linear_lopsided_ce(
        hidden, case["weight"], case["targets"], case["token_weights"], case["groups"]
    )
    out.total.backward()
    ref_hidden = case["hidden"].clone().requires_grad_(True)
    trainer_reference(
        ref_hidden, case["weight"], case["targets"], case["token_weights"], case["groups"]
    ).total.backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)


def test_input_validation() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="targets must be in"):
        bad = dict(case, targets=case["targets"].clamp(min=0) + 50)
        kernels.fused_linear_lopsided_ce(**bad)
    with pytest.raises(ValueError, match="shape"):
        kernels.fused_linear_lopsided_ce(**dict(case, groups=case["groups"][:-1]))
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.fused_linear_lopsided_ce(**dict(case, weight=case["weight"].double()))
    with pytest.raises(ValueError, match="backend"):
        kernels.fused_linear_lopsided_ce(**case, backend="cuda")


def test_dispatch_on_cpu(monkeypatch) -> None:
    from kernels._dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"  # model.kernel_backend=torch on a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_default_chunk_size() -> None:
    assert lopsided_ce.default_chunk_size("torch", 32000, torch.float32) == (16 << 20) // (32000 * 4)
    assert lopsided_ce.default_chunk_size("triton", 128256, torch.bfloat16) == (128 << 20) // (128256 * 2)
    assert lopsided_ce.default_chunk_size("torch", 10**9, torch.float32) == lopsided_ce.MIN_CHUNK_ROWS


COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import lopsided_ce_triton as k

    args = {"logits_ptr": None, "stride_row": "i32", "targets_ptr": "*i64", "V": "i32", "BLOCK_V": "constexpr"}
    fwd = {"ce_ptr": "*fp32", "lse_ptr": "*fp32"}
    bwd = {"lse_ptr": "*fp32", "coef_ptr": "*fp32"}
    for dtype in ("*bf16", "*fp16", "*fp32"):
        for fn, extra in ((k._ce_fwd_kernel, fwd), (k._ce_bwd_kernel, bwd)):
            names = fn.arg_names
            pool = {**args, **extra, "logits_ptr": dtype}
            sig = {name: pool[name] for name in names}
            block, warps = k._launch_params(128256)
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_V": block}),
                                 target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert "cubin" in out.asm, fn
    print("compiled")
    """
)


def test_triton_kernels_compile_for_hopper(tmp_path: Path) -> None:
    assert_compiles_for_hopper(COMPILE_FOR_HOPPER, tmp_path)
