"""nx-kernels-cpu's grouped kernel (s4, grouped s8, GGUF Q4_0 / Q4_1 / Q8_0 layouts) against the
pure-XLA path of `nx.ops.quant._grouped_matmul`, at every dispatch level this CPU runs, inside
jit and scan, the fallbacks where it does not apply, and greedy tokens of whole s4 models.

Tolerance: both paths round the activations into the same int8 term per block of 32 inputs
(`nx.ops.quant.block_terms`) and take the same exact int32 dot per block; they differ only in the
f32 sums over blocks and groups (XLA reduces ``[blocks, m, n]`` then ``[groups, m, n]`` in its
order, the kernel accumulates scaled int32 lanes of 32 or 64 values, then reduces the lanes). Each
such sum of ~k / 32 products rounds to ~k / 32 * 2**-24 of the sum of its magnitudes, so the
results agree to ~1e-6 of the largest output; 1e-5 of it leaves a margin. Against the dequantized
f32 dot (XLA's path for more than 32 rows) they differ by the activations' rounding, at most half
a block scale per input (`_rounding_bound`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nx
from nx import ops
from nx.ops import cpu_kernels
from nx.ops import quant as qops
from nx.ops.quant import QuantizedWeight
from tests.cases.llama import CASES
from tests.conftest import GROUPED_TIE, assert_greedy_up_to_ties, left_padded

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))

ORDER = ["scalar", "avx2", "avx512_vnni", "avx512_bf16"]
#: Every level this CPU runs for int8 (avx512_bf16 runs the int8 kernels as avx512_vnni, so it is left out)
LEVELS = [lv for lv in ORDER[: ORDER.index(cpu_kernels.isa() or "scalar") + 1] if lv != "avx512_bf16"]
TARGET = "nx_kernels_cpu_grouped_matmul"
#: [m, k, n, group_size]: SmolLM2-135M's projections, a slice of its lm head, and odd sizes: an
#: odd number of 32-value shares (AVX-512's half step), n not a multiple of 4, one output, more
#: groups than one scale load (16), groups of 64, 128, 512 and 1024.
SHAPES = [(1, 576, 960, 32), (2, 576, 576, 32), (8, 576, 1536, 32), (16, 1536, 576, 32), (3, 96, 37, 32),
          (5, 160, 6, 32), (1, 32, 1, 32), (4, 1088, 13, 32), (7, 576, 20, 64), (2, 640, 9, 128),
          (1, 1024, 5, 512), (3, 2048, 3, 1024)]
#: (bits, affine): s4 / Q4_0, Q4_1 / Q4_K (unsigned nibbles and offsets), grouped s8 / Q8_0, and
#: int8 with offsets (no GGUF type, but the weight class allows it).
KINDS = [(4, False), (4, True), (8, False), (8, True)]


def _weight(n, k, bits, gs, affine, f16, seed=0):
    rng = np.random.default_rng(seed)
    groups = k // gs
    if bits == 4:
        q = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)  # every nibble, both orders
    else:
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)  # -128 too (GGUF blocks may hold it)
    scale = rng.uniform(1e-3, 1e-1, (n, groups)).astype(np.float32)
    scale[0, 0] = 0.0  # an all-zero group
    zero = rng.uniform(-0.5, 0.5, (n, groups)).astype(np.float32) if affine else None
    dt = np.float16 if f16 else np.float32
    return QuantizedWeight(jnp.asarray(q), jnp.asarray(scale.astype(dt)),
                           zero=None if zero is None else jnp.asarray(zero.astype(dt)), bits=bits, group_size=gs)


def _x(m, k, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    x[-1] = 0.0  # an all-zero row (padding) stays zero
    return x


def _off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")


def _xla_reference(monkeypatch, x, w):
    """`_grouped_matmul`'s XLA path: its int8 dots (m <= 32), else its dequantized f32 dot."""
    _off(monkeypatch)
    ref = np.asarray(jax.jit(qops._grouped_matmul)(jnp.asarray(x), w))
    monkeypatch.delenv(cpu_kernels.ENV)
    return ref


def _int8_reference(x, w):
    """The XLA formulation of the kernel's math for any m: `grouped_int8_dot` and the affine term."""

    def f(x, w):
        y = qops.grouped_int8_dot(x, w)
        if w.zero is not None:
            sums = jnp.sum(x.reshape(x.shape[0], -1, w.group_size), axis=-1)
            y = y + sums @ w.zero.astype(jnp.float32).T
        return y

    return np.asarray(jax.jit(f)(jnp.asarray(x), w))


def _rounding_bound(x, w):
    """Largest |y| change the activations' block rounding can make: sum over inputs of half the
    block's scale times |W|."""
    _, sx = qops.block_terms(jnp.asarray(x))
    half = np.repeat(np.asarray(sx), qops.BLOCK, axis=1) / 2
    n, k = w.shape
    v = np.asarray(w.values(), np.float32).reshape(n, -1, w.group_size)
    vd = np.abs(v * np.asarray(w.scale, np.float32)[..., None]).reshape(n, k)  # the affine term is exact
    return half @ vd.T


def _kernel(x, w, level=None):
    import nx_kernels_cpu

    return np.asarray(jax.jit(lambda x, w: nx_kernels_cpu.grouped_matmul(
        x, w.q, w.scale, w.zero, bits=w.bits, group_size=w.group_size, level=level, panel=w.panel))(x, w))


def _close(got, ref):
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"s{k[0]}{'-affine' if k[1] else ''}")
@pytest.mark.parametrize("level", LEVELS)
def test_grouped_kernel_equals_the_xla_path(monkeypatch, level, kind, f16):
    bits, affine = kind
    for m, k, n, gs in SHAPES:
        w = _weight(n, k, bits, gs, affine, f16)
        x = _x(m, k)
        got = _kernel(x, w, level)
        _close(got, _int8_reference(x, w))
        if m <= qops.BLOCK:  # the off switch's path is the same int8 formulation
            _close(got, _xla_reference(monkeypatch, x, w))
        assert not got[-1].any()  # an all-zero row (padding) stays zero
        if level == LEVELS[-1]:  # through nx.ops.quant as models call it, at the default level
            via_nx = np.asarray(jax.jit(qops.matmul)(jnp.asarray(x), w))
            np.testing.assert_array_equal(via_nx, got)


@pytest.mark.parametrize("gs", [32, 64, 256])
@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"s{k[0]}{'-affine' if k[1] else ''}")
@pytest.mark.parametrize("level", LEVELS)
def test_decode_and_prompt_rows(level, kind, f16, gs):
    """1 ... 130 token rows (decode, the cache-blocked prompt path) against the XLA formulation, with
    a block of zeros inside a row (its scale is 1 and its terms 0) and tiny values in another."""
    bits, affine = kind
    k, n = 768, 45
    w = _weight(n, k, bits, gs, affine, f16, seed=gs)
    for m in (1, 3, 16, 40, 130):
        x = _x(m, k, seed=m)
        x[0, 64:96] = 0.0
        x[-2 if m > 1 else 0, 128:160] *= 1e-30
        _close(_kernel(x, w, level), _int8_reference(x, w))


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("affine", [False, True], ids=["s4", "s4-affine"])
@pytest.mark.parametrize("level", LEVELS)
def test_panels_of_4bit_rows(level, affine, f16):
    """4-bit weights with groups of 32 run in panels of 16 (AVX-512) or 8 (AVX2) weight rows, 4
    blocks (a 64-byte line of each row) at a time, then block by block: n around the panel sizes
    (a last panel of zero rows whose outputs are dropped), k of 1 ... 131 blocks (every remainder
    of 4), and 1 ... 13 token rows (tiles of 8, 4, 3, 2, 1). One block (k = 32) makes an output
    one block dot times its scales, so an integer off by one would show."""
    for k, ns in ((32, (1, 7, 8, 9, 15, 16, 17, 33)), (96, (16, 24)), (160, (31,)), (4192, (17,))):
        for n in ns:
            w = _weight(n, k, 4, 32, affine, f16, seed=n + k)
            for m in (1, 2, 3, 8, 13):
                x = _x(m, k, seed=m)
                _close(_kernel(x, w, level), _int8_reference(x, w))


def test_block_rounding_is_xlas():
    """The kernel's block terms are XLA's, to the last rounding: x built from exact halves (ties,
    rounded to even) and values next to them; one weight row per input picks out each term."""
    k = 64
    rng = np.random.default_rng(5)
    t = rng.integers(-127, 128, (4, k)).astype(np.float32)
    x = (t + rng.choice([0.5, -0.5, 0.49999997, 0.50000006, 0.0], (4, k)).astype(np.float32)) * np.float32(0.37)
    x[:, ::32] = np.float32(127 * 0.37)  # each block's largest: near-ties of x / scale
    q = np.zeros((k, k), np.int8)
    np.fill_diagonal(q, 1)
    w = QuantizedWeight(jnp.asarray(q), jnp.ones((k, 2), jnp.float32), bits=8, group_size=32)
    a, sx = qops.block_terms(jnp.asarray(x))
    want = np.asarray(a, np.float32).reshape(4, k) * np.repeat(np.asarray(sx), 32, axis=1)
    for level in LEVELS:
        np.testing.assert_array_equal(_kernel(x, w, level), want)


@pytest.mark.parametrize("kind", KINDS[:2], ids=["s4", "s4-affine"])
def test_prompt_rows_against_the_dequantized_dot(monkeypatch, kind):
    """Prompt rows through the kernel against XLA's dequantized f32 dot (its path for them without
    the kernel): apart from the block rounding of the activations, f32 accumulation."""
    bits, affine = kind
    k, n = 1024, 64
    w = _weight(n, k, bits, 32, affine, True, seed=7)
    for m in (70, 300):  # 300: past GROUPED_MAX_ROWS, within PANEL_MAX_ROWS (the panels' limit)
        x = _x(m, k, seed=8)
        assert TARGET in jax.jit(qops.matmul).lower(jnp.asarray(x), w).as_text()
        got = _kernel(x, w)
        ref = _xla_reference(monkeypatch, x, w)
        bound = _rounding_bound(x, w) * (1 + 1e-4) + 1e-5 * np.abs(ref).max()
        assert (np.abs(got - ref) <= bound).all()


def test_threads_do_not_change_results():
    import nx_kernels_cpu

    w = _weight(3072, 576, 4, 32, False, True)
    x = _x(4, 576)
    f = [jax.jit(lambda x, t=t: nx_kernels_cpu.grouped_matmul(x, w.q, w.scale, bits=4, group_size=32, threads=t))
         for t in (0, 1)]
    np.testing.assert_array_equal(np.asarray(f[0](x)), np.asarray(f[1](x)))



def test_one_row_chains_from_many_threads_share_the_warm_helpers():
    """One-row products (run by warm helpers that spin for the next job) chained from several host
    threads at once, so the helpers' one offered job is contended and callers fall back to plain
    pool tasks: each chain gives what it gives alone on one thread. The f32 products are above
    the size that starts helpers (`WarmWork`, 2^20 multiply-adds): they take a spinning helper,
    or plain pool tasks where none spins (the first call of a chain)."""
    from concurrent.futures import ThreadPoolExecutor

    import nx_kernels_cpu

    w = _weight(1536, 576, 4, 32, False, True)
    wf = jnp.asarray(np.random.default_rng(3).standard_normal((2048, 576)).astype(np.float32) * 0.02)

    def chain(threads):
        def f(x):
            for i in range(12):  # each call waits for the last, as a decode step's products do
                if i % 2 == 0:
                    y = nx_kernels_cpu.f32_matmul(x, wf, threads=threads)
                else:
                    y = nx_kernels_cpu.grouped_matmul(x, w.q, w.scale, bits=4, group_size=32, threads=threads)
                x = x + 1e-3 * y[:, :576]
            return x

        return jax.jit(f)

    xs = [np.random.default_rng(i).standard_normal((1, 576)).astype(np.float32) for i in range(8)]
    alone = chain(1)
    ref = [np.asarray(alone(x)) for x in xs]
    together = chain(4)  # more helpers than this machine's pool may have
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: np.asarray(together(x)), xs * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, ref[i % len(xs)])

def _lowered(x, w):
    return jax.jit(lambda x: ops.lm_head(x, w)).lower(x).as_text()


def test_dispatch_fallbacks_and_off_switch(monkeypatch):
    w = _weight(40, 96, 4, 32, False, False)
    x = _x(4, 96)
    assert TARGET in _lowered(x, w)  # on by default where the package runs
    for level in LEVELS:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        assert TARGET in _lowered(x, w)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert TARGET not in _lowered(x, w)
    monkeypatch.delenv(cpu_kernels.ENV)
    assert TARGET in _lowered(_x(cpu_kernels.PANEL_MAX_ROWS, 96), w)  # prompts too, up to a limit
    assert TARGET not in _lowered(_x(cpu_kernels.PANEL_MAX_ROWS + 1, 96), w)  # then XLA's dequantized dot
    q8 = _panels(_weight(48, 96, 8, 32, False, True))  # int8 in the panel layout: the panels' limit
    assert TARGET in _lowered(_x(cpu_kernels.PANEL_MAX_ROWS, 96), q8)
    assert TARGET not in _lowered(_x(cpu_kernels.PANEL_MAX_ROWS + 1, 96), q8)
    g64 = _weight(40, 128, 4, 64, False, False)  # other grouped weights: a lower limit
    assert TARGET in _lowered(_x(cpu_kernels.GROUPED_MAX_ROWS, 128), g64)
    assert TARGET not in _lowered(_x(cpu_kernels.GROUPED_MAX_ROWS + 1, 128), g64)
    accel = QuantizedWeight(w.q, w.scale, int8_dot=False, bits=4, group_size=32)
    assert TARGET not in _lowered(x, accel)  # the accelerators' conversion
    # group sizes the kernel does not take (GGUF Q6_K's 16; 96 does not tile 512) and bf16
    # scales stay on XLA's path, with its results
    for other in (_weight(40, 96, 8, 16, False, False), _weight(40, 192, 4, 96, False, False),
                  QuantizedWeight(w.q, w.scale.astype(jnp.bfloat16), bits=4, group_size=32)):
        xo = _x(3, other.shape[1])
        assert TARGET not in _lowered(xo, other)
        got = np.asarray(jax.jit(qops.matmul)(jnp.asarray(xo), other))
        _close(got, _xla_reference(monkeypatch, xo, other))


def test_inside_scan(monkeypatch):
    """Layers scanned over stacked s4 weights (the decoder's layer scan)."""
    x = _x(3, 128, seed=3)
    layers = [_weight(128, 128, 4, 32, False, True, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)

    def run(x, stacked):
        def body(h, w):
            return jnp.tanh(qops.matmul(h, w)), None

        return jax.lax.scan(body, x, stacked)[0]

    assert TARGET in jax.jit(run).lower(x, stacked).as_text()
    got = np.asarray(jax.jit(run)(x, stacked))
    _off(monkeypatch)
    ref = np.asarray(jax.jit(run)(x, stacked))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


CASE = CASES[0]


@pytest.mark.parametrize("quant", ["s4", nx.QuantizationConfig("s8", group_size=32)], ids=["s4", "s8-g32"])
def test_greedy_tokens_equal_the_xla_path(saved_case, monkeypatch, quant):
    """A whole grouped model (its programs through the kernel) against the same model on XLA's
    path, at every level: the same greedy tokens up to near-ties, prompt logits to 1e-3. The two
    paths differ by f32 rounding in each matmul, but the next layer rounds its activations to int8
    steps of 1/254 of a block's largest value, and a value that rounding moves across a step's
    midpoint moves by a whole step: the differences grow past f32 rounding (with the former ~15-bit
    terms the same flips were 128 times smaller)."""
    _, path = saved_case(CASE)
    load = dict(n_positions=[64], context_length_estimate=[16], progress=False, quant=quant, batch_size=2)
    ids, mask = left_padded([9, 5], CASE.vocab, seed=11)
    prompt = ids.shape[1]

    def greedy():
        model = nx.load("llama", path, **load)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy()
        return model, tokens, model.logits(ids, mask)

    _off(monkeypatch)
    ref_model, ref_tokens, ref_logits = greedy()
    forced = ref_model.forced_logits(ids, ref_tokens[:, prompt:-1], mask)
    for level in LEVELS:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        _, tokens, logits = greedy()
        assert_greedy_up_to_ties(ref_tokens, tokens, prompt, forced, GROUPED_TIE)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=1e-3 * np.abs(ref_logits).max())


# ---- the panel layout (QuantizedWeight.panel): the same bytes and scales, transposed at load ----


def _panels(w):
    """`w` (rows layout, numpy-backed) in the panel layout, as `nx.quant.panel_layout` converts it."""
    return jax.tree.map(np.asarray, w).panels()


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"s{k[0]}{'-affine' if k[1] else ''}")
@pytest.mark.parametrize("level", LEVELS)
def test_panel_layout_equals_the_rows_layout(level, kind, f16):
    """The kernel on the panel layout against the rows layout at every level (the scalar level
    gathers the layout's bytes): 4-bit bit for bit (the same block dots summed in the same order),
    int8 (panels here, rows tiles there: another f32 order) to f32 rounding and against the XLA
    formulation; 1, 3 and 131 blocks, one and several panels, 1 ... 13 token rows and a prompt of
    70. int8 values cover -128 ... 127, whose flipped sign bits make 0 ... 255."""
    bits, affine = kind
    for k, n in ((32, 16), (96, 48), (4192, 32)):
        w = _weight(n, k, bits, 32, affine, f16, seed=n + k)
        p = _panels(w)
        assert p.shape == w.shape == (n, k)
        for m in (1, 2, 3, 8, 13, 70):
            x = _x(m, k, seed=m)
            got = _kernel(x, p, level)
            if bits == 4 or level == "scalar":
                np.testing.assert_array_equal(got, _kernel(x, w, level))
            else:
                _close(got, _int8_reference(x, w))
                _close(got, _kernel(x, w, level))


def test_panel_layout_round_trip_and_xla_paths(monkeypatch):
    """`to_panels` / `from_panels` invert each other (numpy at load, jax in programs, with a leading
    layer axis); XLA's paths (kernels off) read a panel-layout weight back as rows: its matmul,
    dequantized values and embedding rows equal the rows layout's; with the kernels on, nx's
    matmul takes the panel kernel."""
    w = _weight(48, 96, 4, 32, True, True, seed=3)
    q = np.asarray(w.q)
    stacked = np.stack([q, q[::-1]])
    packed = qops.to_panels(stacked, 4)
    assert packed.shape == (2, 3, 3, 256)
    np.testing.assert_array_equal(np.asarray(qops.from_panels(jnp.asarray(packed), 4)), stacked)
    np.testing.assert_array_equal(packed[0, 1, 2, 64 * 3 + 4 * 5 + 2], q[16 + 5, 16 * 2 + 4 * 3 + 2])
    q8 = np.asarray(_weight(32, 64, 8, 32, False, False).q)
    p8 = qops.to_panels(q8, 8)
    assert p8.shape == (2, 2, 512)
    np.testing.assert_array_equal(p8[1, 1, 64 * 7 + 4 * 9 + 3], q8[16 + 9, 32 + 4 * 7 + 3])
    np.testing.assert_array_equal(np.asarray(qops.from_panels(jnp.asarray(p8), 8)), q8)
    s = np.asarray(w.scale)
    np.testing.assert_array_equal(qops.to_panels(s)[2, 1, 7], s[32 + 7, 1])
    np.testing.assert_array_equal(np.asarray(qops.from_panels(jnp.asarray(qops.to_panels(s)))), s)
    p = _panels(w)
    ids = jnp.asarray([[0, 17, 47], [31, 16, 5]])
    np.testing.assert_array_equal(np.asarray(qops.take_rows(p, ids, jnp.float32)),
                                  np.asarray(qops.take_rows(w, ids, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(w.dequantize()))
    w8 = _weight(48, 64, 8, 32, False, True, seed=4)
    np.testing.assert_array_equal(np.asarray(qops.take_rows(_panels(w8), ids, jnp.float32)),
                                  np.asarray(qops.take_rows(w8, ids, jnp.float32)))
    x = jnp.asarray(_x(5, 96))
    assert TARGET in jax.jit(qops.matmul).lower(x, p).as_text()
    np.testing.assert_array_equal(np.asarray(jax.jit(qops.matmul)(x, p)), np.asarray(jax.jit(qops.matmul)(x, w)))
    _off(monkeypatch)
    np.testing.assert_array_equal(np.asarray(jax.jit(qops.matmul)(x, p)), np.asarray(jax.jit(qops.matmul)(x, w)))


def test_panel_layout_at_load(monkeypatch):
    """`nx.quant.panel_layout` converts the 4-bit, groups-of-32 weights the kernels read whose
    outputs (per column-parallel shard) are whole panels, and nothing where the kernels are off."""
    from nx.quant import panel_layout

    def tree():
        return {"layers": [{"qkv": {"w": _weight(64, 64, 4, 32, False, False)},  # column: 32 rows a shard at tp 2
                            "o": {"w": _weight(48, 64, 4, 32, False, False)},  # row: not split by outputs
                            "up": {"w": _weight(40, 64, 4, 32, False, False)},  # 40 rows: no whole panels
                            "down": {"w": _weight(48, 128, 4, 64, False, False)},  # groups of 64
                            "gate": {"w": _weight(32, 64, 8, 32, False, True)}}],  # int8, groups of 32
                "embed": {"w": _weight(48, 64, 4, 32, False, False)}}  # vocab: 24 rows a shard at tp 2

    layer, out = tree()["layers"][0], panel_layout(tree(), tp=1)
    got = {name: w["w"].panel for name, w in out["layers"][0].items()}
    assert got == {"qkv": True, "o": True, "up": False, "down": False, "gate": True} and out["embed"]["w"].panel
    np.testing.assert_array_equal(np.asarray(out["layers"][0]["qkv"]["w"].values()), np.asarray(layer["qkv"]["w"].values()))
    for w in (out["layers"][0]["qkv"]["w"], out["embed"]["w"]):  # aligned: placed without a copy
        assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in (w.q, w.scale))
    two = panel_layout(tree(), tp=2)
    assert two["layers"][0]["qkv"]["w"].panel and two["layers"][0]["o"]["w"].panel and not two["embed"]["w"].panel
    _off(monkeypatch)
    assert not panel_layout(tree())["layers"][0]["qkv"]["w"].panel


def test_panel_layout_returns_freed_memory_as_it_goes(monkeypatch):
    """Each converted weight's old host copy is released at once, and the freed heap goes back to
    the OS every `nx.memory.TRIM_BYTES` (glibc keeps it otherwise: a 1B Q4_0 GGUF's load peaked at 1.9x the
    file instead of 1.2x)."""
    import weakref

    from nx import memory
    from nx import quant as nq

    trims = []
    monkeypatch.setattr(memory, "return_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(memory, "TRIM_BYTES", 1)
    ws = [_weight(32, 64, 4, 32, False, False, seed=s) for s in range(3)]
    ws = [QuantizedWeight(np.asarray(w.q), np.asarray(w.scale), bits=4, group_size=32) for w in ws]
    old = [weakref.ref(w.q) for w in ws]
    tree = {"layers": [{"qkv": {"w": w}} for w in ws]}
    del ws
    nq.panel_layout(tree)
    assert all(r() is None for r in old) and len(trims) >= 3


def test_panel_layout_inside_scan(monkeypatch):
    """Layers scanned over stacked panel-layout weights, against the same layers in rows layout."""
    x = _x(3, 128, seed=3)
    layers = [_weight(64, 128, 4, 32, False, True, seed=s) for s in range(3)]
    w2 = [_weight(128, 64, 4, 32, False, True, seed=10 + s) for s in range(3)]

    def run(x, stacked):
        def body(h, ws):
            return jnp.tanh(qops.matmul(jnp.tanh(qops.matmul(h, ws[0])), ws[1])), None

        return jax.lax.scan(body, x, stacked)[0]

    def stack(ws):
        return jax.tree.map(lambda *a: jnp.stack(a), *ws)

    rows = (stack(layers), stack(w2))
    panels = (stack([_panels(w) for w in layers]), stack([_panels(w) for w in w2]))
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(x, panels)), np.asarray(jax.jit(run)(x, rows)))


def test_panel_layout_bad_shapes():
    import nx_kernels_cpu

    w = _panels(_weight(32, 64, 4, 32, False, False))
    with pytest.raises(ValueError, match="panel layout"):
        nx_kernels_cpu.grouped_matmul(_x(1, 96), w.q, w.scale, bits=4, group_size=32, panel=True)
    with pytest.raises(ValueError, match="panel layout"):
        nx_kernels_cpu.grouped_matmul(_x(1, 64), w.q, w.scale, bits=4, group_size=64, panel=True)
