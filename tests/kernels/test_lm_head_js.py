"""Triton fused lm_head + JS (and teacher log-sum-exp) against a float64 reference."""
import math

import pytest
import torch

from emloc_kernels.lm_head_js import (TeacherJS, lm_head_js, lm_head_js_reference, teacher_logsumexp,
                                      teacher_logsumexp_reference)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, V, H): multiple row blocks and vocabulary splits, one row, V below one vocabulary block,
# ragged last vocabulary block / split, H not a multiple of the H block.
SHAPES = [(24, 1000, 72), (1, 1100, 72), (17, 50, 33)]


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like float buffer starts as NaN: unwritten partials fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def make_inputs(n, v, h, dtype, student_noise, seed=0):
    """Teacher/student hidden states [n, h] and weight [v, h]; logits have std ~4."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g) * (4.0 / math.sqrt(h))
    teacher = torch.randn(n, h, generator=g)
    student = teacher + student_noise * torch.randn(n, h, generator=g)
    return student.to(dtype), teacher.to(dtype), weight.to(dtype)


def reference64(student, teacher, weight):
    """Float64 JS [N] and teacher log-sum-exp [N] from the (possibly low-precision) inputs."""
    w = weight.double()
    t_logits, s_logits = teacher.double() @ w.T, student.double() @ w.T
    log_p, log_q = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    js = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
    return js, torch.logsumexp(t_logits, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,h", SHAPES)
def test_teacher_logsumexp(n, v, h, dtype, poisoned):
    _, teacher, weight = make_inputs(n, v, h, dtype, 0.0)
    lse = teacher_logsumexp(teacher, weight, backend="triton")
    _, lse64 = reference64(teacher, teacher, weight)
    ref_err = (teacher_logsumexp_reference(teacher, weight).double() - lse64).abs()
    assert lse.dtype == torch.float32 and lse.shape == (n,)
    assert torch.isfinite(lse).all()
    assert ((lse.double() - lse64).abs() <= 2 * ref_err + 1e-5 * lse64.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("noise", [1.0, 0.05])
def test_js_matches_float64(n, v, h, dtype, noise, poisoned):
    student, teacher, weight = make_inputs(n, v, h, dtype, noise, seed=n + v)
    js64, _ = reference64(student, teacher, weight)
    teacher_lse = teacher_logsumexp(teacher, weight, backend="triton")
    js = lm_head_js(student, teacher, weight, teacher_lse, backend="triton")
    torch_js = lm_head_js_reference(student, teacher, weight,
                                    teacher_logsumexp_reference(teacher, weight))
    assert js.dtype == torch.float32 and js.shape == (n,)
    assert (js >= 0).all() and (js <= math.log(2.0)).all()
    if noise == 1.0:  # clearly different distributions
        assert js64.mean() > 0.1 and (js64 > 0.01).all()
        assert ((js.double() - js64).abs() <= 1e-4 * js64).all()
    torch_err = (torch_js.double() - js64).abs()
    assert ((js.double() - js64).abs() <= 2 * torch_err + 2e-5 * js64 + 2e-7).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_teacher_and_student(dtype, poisoned):
    _, teacher, weight = make_inputs(20, 300, 72, dtype, 0.0)
    for teacher_lse in (teacher_logsumexp(teacher, weight, backend="triton"),
                        teacher_logsumexp_reference(teacher, weight)):
        js = lm_head_js(teacher.clone(), teacher, weight, teacher_lse, backend="triton")
        assert js.shape == (20,)
        assert (js >= 0).all() and (js <= 1e-6).all()


def test_strided_inputs_and_determinism():
    student, teacher, weight = make_inputs(20, 300, 40, torch.float32, 1.0)
    wide = torch.zeros(2, 20, 80)
    wide[0, :, ::2], wide[1, :, ::2] = student, teacher
    weight_t = weight.T.contiguous()  # [H, V] storage, viewed back as [V, H]
    lse = teacher_logsumexp(wide[1, :, ::2], weight_t.T, backend="triton")
    js = lm_head_js(wide[0, :, ::2], wide[1, :, ::2], weight_t.T, lse, backend="triton")
    again = lm_head_js(student, teacher, weight,
                       teacher_logsumexp(teacher, weight, backend="triton"), backend="triton")
    js64, lse64 = reference64(student, teacher, weight)
    assert torch.allclose(lse.double(), lse64, rtol=1e-5, atol=1e-6)
    assert torch.allclose(js.double(), js64, rtol=1e-4, atol=1e-6)
    assert torch.equal(js, again)


def test_empty_rows():
    weight = torch.randn(100, 16)
    empty = torch.empty(0, 16)
    assert teacher_logsumexp(empty, weight, backend="triton").shape == (0,)
    js = lm_head_js(empty, empty, weight, torch.empty(0), backend="triton")
    assert js.shape == (0,) and js.dtype == torch.float32


@pytest.mark.parametrize("case", ["hidden_size", "rows", "dtype", "int_dtype", "lse_shape",
                                  "lse_dtype", "rank", "empty_vocab"])
def test_invalid_input_raises(case):
    student, teacher, weight = make_inputs(4, 100, 16, torch.float32, 1.0)
    lse = torch.zeros(4)
    if case == "hidden_size":
        student = torch.randn(4, 17)
    elif case == "rows":
        teacher = torch.randn(5, 16)
    elif case == "dtype":
        student = student.half()
    elif case == "int_dtype":
        student, teacher, weight = (x.to(torch.int32) for x in (student, teacher, weight))
    elif case == "lse_shape":
        lse = torch.zeros(4, 1)
    elif case == "lse_dtype":
        lse = lse.double()
    elif case == "rank":
        student = student[None]
    elif case == "empty_vocab":
        weight = weight[:0]
    with pytest.raises(ValueError):
        lm_head_js(student, teacher, weight, lse, backend="triton")
    if case in ("hidden_size", "dtype", "int_dtype", "rank", "empty_vocab"):
        with pytest.raises(ValueError):
            teacher_logsumexp(student, weight, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("replicas", [1, 3])
def test_teacher_js_matches_float64(backend, dtype, replicas, poisoned):
    """TeacherJS (teacher statistics cached once) on replica-major students equals the float64
    JS of each replica against the same teacher rows."""
    n, v, h = 7, 300, 40
    students, teacher, weight = [], None, None
    for r in range(replicas):
        student, teacher, weight = make_inputs(n, v, h, dtype, [1.0, 0.05, 0.3][r], seed=5)
        students.append(student)
    js = TeacherJS(teacher, weight, backend=backend)(torch.cat(students), replicas=replicas)
    js64 = torch.cat([reference64(s, teacher, weight)[0] for s in students])
    assert js.dtype == torch.float32 and js.shape == (replicas * n,)
    assert js64.min() > 1e-4  # every replica differs from the teacher
    torch_err = torch.cat([
        (lm_head_js_reference(s, teacher, weight, teacher_logsumexp_reference(teacher, weight)).double()
         - reference64(s, teacher, weight)[0]).abs() for s in students])
    assert ((js.double() - js64).abs() <= 2 * torch_err + 2e-5 * js64 + 2e-7).all()


def test_teacher_js_rejects_wrong_rows():
    student, teacher, weight = make_inputs(4, 100, 16, torch.float32, 1.0)
    with pytest.raises(ValueError, match="replicas"):
        TeacherJS(teacher, weight, backend="torch")(torch.cat([student, student]), replicas=1)
    with pytest.raises(ValueError, match="hidden size"):
        TeacherJS(teacher, weight, backend="torch")(torch.randn(4, 17))
