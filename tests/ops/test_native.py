"""ops/native: the C int8 kernel against exact products, its build, and the fallbacks when it cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch

from jetmoe.ops import native

requires_native = pytest.mark.skipif(native.load() is None, reason="no C compiler or no AVX-512 VNNI/BF16 here")


@pytest.fixture
def fresh_native_state(monkeypatch, tmp_path):
    """Let a test change the build settings; the cached library is dropped before and after."""
    monkeypatch.setenv("JETMOE_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native.load.cache_clear()


def _bound(x, q, scale, dtype):
    """|kernel - exact| allowed: the activations' 16-bit grid, fp32 sums, and the final rounding to dtype."""
    x64, w64 = x.double(), q.double() * scale.double()[:, None]
    exact = x64 @ w64.T
    grid = x64.abs().amax(1, keepdim=True) / 32767  # >= half the grid step
    absolute = grid * w64.abs().sum(1)[None] + 1e-6 * (x64.abs() @ w64.abs().T)
    return exact, absolute + exact.abs() * torch.finfo(dtype).eps


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m_rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(7, 32), (64, 4160), (1030, 1024)])  # (out, in): odd blocks, > 2048 columns
def test_int8_gemv_matches_the_dequantised_product(dtype, m_rows, shape):
    torch.manual_seed(0)
    rows, cols = shape
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scale = (torch.rand(rows) * 0.02 + 1e-3).to(dtype)
    x = torch.randn(m_rows, cols).to(dtype)
    got = native.int8_gemv(x, q, scale)
    assert got.dtype == dtype and got.shape == (m_rows, rows)
    exact, bound = _bound(x, q, scale, dtype)
    assert ((got.double() - exact).abs() <= bound).all()


@requires_native
def test_int8_gemv_is_exact_where_the_activations_sit_on_the_grid():
    """Small integer activations and unit scales: every step is exact, so any indexing slip shows."""
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (37, 2112), dtype=torch.int8)
    x = torch.randint(-100, 101, (5, 2112)).float()
    x[2] = 0  # an all-zero row
    got = native.int8_gemv(x, q, torch.ones(37))
    assert torch.equal(got, (x.double() @ q.double().T).float())


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m_rows", [1, 2, 3, 5, 6, 16])
@pytest.mark.parametrize("shape", [(7, 32), (1030, 1024), (64, 4160)])
def test_gemv_is_the_exact_sum_rounded_once(m_rows, shape, dtype):
    """Small integers: every product and fp32 partial sum is exact (below 2^24), so the kernel must give the
    exact sum rounded once to the dtype (any indexing slip or double rounding shows)."""
    torch.manual_seed(5)
    rows, cols = shape
    weight = torch.randint(-8, 9, (rows, cols)).to(dtype)
    x = torch.randint(-8, 9, (m_rows, cols)).to(dtype)
    got = native.gemv(x, weight)
    assert got.dtype == dtype and got.shape == (m_rows, rows)
    assert torch.equal(got, (x.double() @ weight.double().T).to(dtype))


@requires_native
def test_fp32_gemv_on_random_values_is_close_to_the_exact_sum():
    torch.manual_seed(6)
    weight, x = torch.randn(300, 1024), torch.randn(3, 1024)
    exact = x.double() @ weight.double().T
    bound = 1e-6 * (x.double().abs() @ weight.double().abs().T)
    assert ((native.gemv(x, weight).double() - exact).abs() <= bound).all()


@requires_native
def test_bf16_gemv_on_random_values_is_within_one_rounding():
    torch.manual_seed(6)
    weight, x = torch.randn(300, 1024).bfloat16(), torch.randn(3, 1024).bfloat16()
    exact = x.double() @ weight.double().T
    bound = exact.abs() * 2**-8 + 1e-6 * (x.double().abs() @ weight.double().abs().T)
    assert ((native.gemv(x, weight).double() - exact).abs() <= bound).all()


@requires_native
def test_gemv_rows_batched_equal_rows_alone():
    """Rows go through a weight block in fours, pairs and singly (bf16, fp32 and int8 kernels): a row's value
    never depends on which."""
    torch.manual_seed(8)
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(1030, 1024, dtype=dtype)  # 257 whole blocks of 4 weight rows and a last one of 2
        x = torch.randn(11, 1024, dtype=dtype)
        alone = torch.cat([native.gemv(x[i : i + 1], weight) for i in range(11)])
        for rows in range(1, 12):
            assert torch.equal(native.gemv(x[:rows], weight), alone[:rows]), (dtype, rows)
    q = torch.randint(-127, 128, (1030, 4160), dtype=torch.int8)  # two column chunks of the int8 kernel's sums
    scale, x = torch.rand(1030).bfloat16(), torch.randn(11, 4160).bfloat16()
    alone = torch.cat([native.int8_gemv(x[i : i + 1], q, scale) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(native.int8_gemv(x[:rows], q, scale), alone[:rows]), rows


@requires_native
def test_groups_give_each_row_its_experts_product_bit_for_bit():
    """Slots, groups by expert ends, and the dense form: a row's value never depends on the grouping."""
    torch.manual_seed(7)
    experts = torch.randn(5, 96, 64).bfloat16()
    q = torch.randint(-127, 128, (5, 96, 64), dtype=torch.int8)
    scale = torch.rand(5, 96).bfloat16()
    x = torch.randn(6, 64).bfloat16()
    slot_experts = (3, 0, 3, 4, 1, 1)
    per_row_bf16 = torch.cat([native.gemv(x[i : i + 1], experts[e]) for i, e in enumerate(slot_experts)])
    per_row_fp32 = torch.cat(
        [native.gemv(x[i : i + 1].float(), experts[e].float()) for i, e in enumerate(slot_experts)]
    )
    per_row_int8 = torch.cat([native.int8_gemv(x[i : i + 1], q[e], scale[e]) for i, e in enumerate(slot_experts)])
    groups = native.slot_groups(slot_experts)
    assert groups[:6] == [3, 0, 1, 0, 1, 2]
    assert torch.equal(native.gemv(x, experts, groups), per_row_bf16)
    assert torch.equal(native.gemv(x.float(), experts.float(), groups), per_row_fp32)
    assert torch.equal(native.int8_gemv(x, q, scale, groups), per_row_int8)
    # rows grouped by expert: 0 -> rows 0-1, 1 -> none, 2 -> rows 2-4, 3 -> none, 4 -> row 5
    ends = [2, 2, 5, 5, 6]
    assert native.ends_groups(ends) == [0, 0, 2, 2, 2, 5, 4, 5, 6]
    grouped_experts = (0, 0, 2, 2, 2, 4)
    by_row = torch.cat([native.gemv(x[i : i + 1], experts[e]) for i, e in enumerate(grouped_experts)])
    assert torch.equal(native.gemv(x, experts, native.ends_groups(ends)), by_row)


@requires_native
def test_bad_groups_and_dtypes_are_rejected():
    x, experts = torch.randn(2, 64).bfloat16(), torch.randn(3, 8, 64).bfloat16()
    with pytest.raises(ValueError, match="gemv"):
        native.gemv(x, experts, [3, 0, 1])  # no expert 3
    with pytest.raises(ValueError, match="gemv"):
        native.gemv(x, experts, [0, 1, 3])  # past the last row
    with pytest.raises(ValueError, match="all bfloat16 or all float32"):
        native.gemv(x.half(), experts.half())
    with pytest.raises(ValueError, match="all bfloat16 or all float32"):
        native.gemv(x, experts.float())  # mixed
    assert not native.gemv_ok(x, experts.float()) and not native.gemv_ok(x.half(), experts.half())
    with pytest.raises(ValueError, match="int8"):
        native.int8_gemv(x, experts, torch.ones(3, 8))  # bf16 weights given as int8
    with pytest.raises(ValueError, match="gemv"):
        native.gemv(x, experts.to("meta"))  # never a pointer from another device


@requires_native
@pytest.mark.parametrize("slot_experts", [(3,), (3, 5), (2, 2, 7, 0)])
def test_product_and_next_step_in_one_call_equal_the_two_steps(slot_experts):
    """gemv_silu_mul and gemv_combine (decoding: the step after a product in the same C call) give the values
    of the product and the element-wise kernel run one after the other, bit for bit, in bf16 and fp32."""
    for dtype in (torch.bfloat16, torch.float32):
        _check_product_and_next_step(slot_experts, dtype)


def _check_product_and_next_step(slot_experts, dtype):
    from jetmoe.ops.native import elementwise

    torch.manual_seed(0)
    rows = len(slot_experts)
    groups = native.slot_groups(slot_experts)
    up = torch.randn(8, 2 * 192, 256, dtype=dtype)
    x = torch.randn(rows, 256, dtype=dtype)
    expected = elementwise.silu_mul(native.gemv(x, up, groups))
    assert torch.equal(native.gemv_silu_mul(x, up, groups), expected)

    down = torch.randn(8, 80, 192, dtype=dtype)
    h = torch.randn(rows, 192, dtype=dtype)
    k = 1 if rows == 1 else 2 if rows == 2 else 4
    gates = torch.rand(rows // k, k, dtype=dtype)
    bias = torch.randn(80, dtype=dtype)
    expected = elementwise.combine(native.gemv(h, down, groups), None, gates, bias)
    assert torch.equal(native.gemv_combine(h, down, groups, gates, bias), expected)


@requires_native
def test_product_and_next_step_reject_what_they_cannot_do():
    x, up, down = torch.randn(2, 64).bfloat16(), torch.randn(4, 128, 64).bfloat16(), torch.randn(4, 48, 64).bfloat16()
    gates, bias = torch.rand(1, 2).bfloat16(), torch.randn(48).bfloat16()
    groups = native.slot_groups((1, 2))
    with pytest.raises(ValueError, match="every row in a group"):
        native.gemv_silu_mul(x, up, [1, 0, 1])  # row 1 in no group: its activation would read garbage
    with pytest.raises(ValueError, match="2I % 64"):
        native.gemv_silu_mul(x, torch.randn(4, 96, 64).bfloat16(), groups)
    with pytest.raises(ValueError, match="all bfloat16 or all float32"):
        native.gemv_silu_mul(x.float(), up, groups)
    with pytest.raises(ValueError, match="all bfloat16 or all float32"):
        native.gemv_combine(x, down, groups, gates.float(), bias)
    with pytest.raises(ValueError, match="gates"):
        native.gemv_combine(x, down, groups, torch.rand(2, 2).bfloat16(), bias)  # 4 slots for 2 rows
    with pytest.raises(ValueError, match="bias"):
        native.gemv_combine(x, down, groups, gates, torch.randn(40).bfloat16())
    with pytest.raises(ValueError, match="groups"):
        native.gemv_combine(x, down, [9, 0, 2], gates, bias)  # no expert 9


@requires_native
def test_int8_gemv_does_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    q = torch.randint(-127, 128, (301, 1024), dtype=torch.int8)
    x, scale = torch.randn(4, 1024).bfloat16(), torch.rand(301).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int8_gemv(x, q, scale)
        torch.set_num_threads(2)
        two = native.int8_gemv(x, q, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@requires_native
def test_int8_gemv_takes_strided_inputs_and_rejects_bad_shapes():
    q = torch.randint(-127, 128, (8, 64, 3), dtype=torch.int8)[..., 0]  # not contiguous
    x = torch.randn(2, 128)[:, ::2]
    expected = native.int8_gemv(x.contiguous(), q.contiguous(), torch.ones(8))
    assert torch.equal(native.int8_gemv(x, q, torch.ones(8)), expected)
    with pytest.raises(ValueError, match="int8_gemv"):
        native.int8_gemv(torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.int8), torch.ones(8))  # 48 % 32
    with pytest.raises(ValueError, match="int8_gemv"):
        native.int8_gemv(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))


def test_switched_off_by_the_environment_and_int8_layers_still_work(fresh_native_state):
    from jetmoe.modeling.int8 import quantize_tensor
    from jetmoe.ops.int8 import int8_matmul

    fresh_native_state.setenv("JETMOE_NATIVE_KERNELS", "0")
    assert native.load() is None and not native.available()
    torch.manual_seed(3)
    q, scale = quantize_tensor(torch.randn(40, 64))
    x = torch.randn(1, 64).bfloat16()
    exact, bound = _bound(x, q, scale.bfloat16(), torch.bfloat16)
    got = int8_matmul(x, q, scale.bfloat16())  # aten's int8 kernel
    assert ((got.double() - exact).abs() <= bound + 0.02 * exact.abs()).all()


@requires_native
def test_a_failing_compiler_warns_once_and_falls_back(fresh_native_state):
    fresh_native_state.setenv("CC", "false")  # exits 1: the build fails
    with pytest.warns(UserWarning, match="native CPU kernels unavailable"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None  # cached: no second build, no second warning


@requires_native
def test_the_library_is_built_into_the_cache_directory_once(fresh_native_state, tmp_path):
    assert native.load() is not None
    built = list((tmp_path / "native").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.partial"))
    mtime = built[0].stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load() is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


@requires_native
def test_int8_layers_compile_to_one_graph_through_the_kernel():
    """Under torch.compile the kernel is an opaque custom op: no graph break, eager's values."""
    from jetmoe.modeling.int8 import quantize_tensor
    from jetmoe.ops.int8 import int8_matmul

    torch.manual_seed(4)
    q, scale = quantize_tensor(torch.randn(96, 64))
    scale = scale.bfloat16()
    x = torch.randn(2, 64).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: int8_matmul(x, q, scale) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), native.int8_gemv(x, q, scale) * 2)


@requires_native
def test_which_products_the_kernels_take():
    x, weight = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert native.gemv_ok(x, weight)
    assert not native.gemv_ok(x, torch.randn(64, 8).bfloat16().t())  # a transposed view would be copied
    assert not native.gemv_ok(x.half(), weight.half()) and native.gemv_ok(x.float(), weight.float())
    assert not native.gemv_ok(torch.randn(1, 48).bfloat16(), torch.randn(8, 48).bfloat16())  # 48 % 32
    q = torch.zeros(8, 64, dtype=torch.int8)
    assert native.int8_ok(x, q, torch.ones(8)) and native.int8_ok(x.half(), q, torch.ones(8).half())
    assert not native.int8_ok(x, torch.zeros(8, 48, dtype=torch.int8), torch.ones(8))


@requires_native
def test_dense_layers_decode_through_the_kernel_up_to_8_rows(monkeypatch):
    from jetmoe.ops import dense

    calls = []
    kernel = native.gemv
    monkeypatch.setattr(native, "gemv", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        calls.clear()
        layer = dense.Linear(64, 40, bias=False).to(dtype)
        with torch.no_grad():
            for rows in (1, 8, 9):
                x = torch.randn(rows, 64, dtype=dtype)
                expected = torch.nn.functional.linear(x, layer.weight)
                torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance)
            layer(torch.randn(2, 4, 64, dtype=dtype))  # [batch, seq, in]: 8 rows
        x = torch.randn(1, 64, dtype=dtype).requires_grad_()
        layer(x).sum().backward()  # autograd: F.linear
        assert calls == [1, 8, 8], dtype


@requires_native
def test_int8_gemv_puts_bf16_rows_on_the_same_grid_as_fp32_ones():
    """bf16 activations are quantised 16 lanes at a time, fp32 ones one by one: the same grid, so the same
    products (rounded once to bf16), including rows holding inf or nan and all-zero rows."""
    torch.manual_seed(3)
    q = torch.randint(-127, 128, (40, 1024), dtype=torch.int8)
    scale = (torch.rand(40) * 0.02 + 1e-3).to(torch.bfloat16)
    x = (torch.randn(7, 1024) * torch.logspace(-3, 3, 7)[:, None]).to(torch.bfloat16)
    x[1, 5] = x[1].abs().max() * -4  # the largest magnitude negative
    x[2] = 0
    x[3, 700] = float("inf")
    x[4, 3] = float("nan")
    x[5, ::2] = 0.5  # ties at the grid's half steps
    got = native.int8_gemv(x, q, scale)
    want = native.int8_gemv(x.float(), q, scale.float()).to(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
