"""Custom CPU kernels for nx's int8, bf16 and f32 decode matmuls, when the optional nx-kernels-cpu package runs.

`s8_matmul(x, w)` returns f32 ``x @ W.T`` for a per-row int8 weight through the package's XLA
FFI kernel (int8 dots with AVX-512 VNNI or AVX2, the same activation terms and int32 sums as the
pure-XLA path, so the same results), or None when the kernel does not apply and the caller runs
the pure-XLA path. It applies when all of these hold:

- the weight is for the cpu backend (`QuantizedWeight.int8_dot`), 8-bit with one scale per row;
- ``x`` has at most `MAX_ROWS` (2048) rows at the AVX-512 levels: decode and prompts (cache-blocked
  register tiles; longer prompts stay on XLA's dots); `AVX2_MAX_ROWS` (16) at the ``avx2`` and
  ``scalar`` levels (decode);
- `nx_kernels_cpu` imports and the CPU has AVX2 or better (`available`);
- ``NX_CPU_KERNELS`` is not ``off``.

`grouped_matmul(x, w)` is the same for a grouped weight (``group_size``: nx's ``s4``, grouped
``s8``, GGUF Q4_0 / Q4_1 / Q4_K / Q8_0): bits 4 (packed, unpacked in registers; with groups of 32
in panels of 16 or 8 weight rows transposed in registers, so that each int32 lane sums one row's
whole block and the f32 work runs once a block for the panel, not once per 4 values and row) or 8,
and in the panel layout (`nx.ops.quant.QuantizedWeight.panel`: 4-bit or int8 with groups of 32,
transposed at load) the same panels with no transposes, symmetric or affine (``zero``), f32 or f16 scales, ONE int8 activation term per block of 32 inputs
(`nx.ops.quant.block_terms`, llama.cpp's q8_0 activations: half the dot work of the two terms
per row the per-row kernel takes) and the same exact int32 dots per block as
`nx.ops.quant.grouped_int8_dot`; only the f32 sums over blocks and groups run in another order, so
results agree to f32 rounding (~1e-6 of the largest output), not bit for bit. It applies under
the same conditions with 8-bit replaced by: bits 4 or 8, ``group_size`` a multiple of 32 (GGUF
Q6_K's 16 stays on XLA), scales and offsets f32 or f16, and up to `GROUPED_MAX_ROWS` (256) rows,
`PANEL_MAX_ROWS` (1024) for 4-bit weights with groups of 32 and int8 ones in the panel layout:
prompts run the kernel too
(cache-blocked; more rows stay on XLA's dequantized dot, as fast there).

`bf16_matmul(x, w, xla, dtype)` returns ``x @ w.T`` in `dtype` for a plain bf16 ``w [out, in]``
(``amp="bf16"`` weights) and a bf16 or f32 ``x`` through the package's bf16 kernel (AVX512_BF16
``vdpbf16ps`` register tiles for decode and panels for prompts, AVX-512F or AVX2 fused
multiply-adds: exact products summed in f32, in another order than XLA's; a bf16 result rounded to
nearest even as the kernel stores it), or None where it does not apply. A plain array does not say
which backend it is for, so the kernel is staged with `jax.lax.platform_dependent`: programs lowered
for the cpu platform call it, any other platform gets ``xla(x, w)`` (the caller's pure-XLA path; the
FFI target exists only for cpu). It applies for a 2-D bf16 ``w``, a bf16 or f32 ``x``, when
`enabled`, and for at most `BF16_MAX_ROWS` token rows with bf16 ``x`` at the ``avx512_bf16``
level (`BF16_TILES_MAX_ROWS` with an nx-kernels-cpu before 0.7), `BF16_NARROW_MAX_ROWS` otherwise.

`bf16_glu(x, w, act, xla)` is a gated MLP's first layer, ``act(x @ Wg.T) * (x @ Wu.T)`` for a fused
bf16 ``w = [Wg; Wu]``, through the same kernel's prompt panels with ``act`` (silu) and the product
applied as the sums leave the registers, for `BF16_GLU_MIN_ROWS` to `BF16_MAX_ROWS` bf16 token rows
at the ``avx512_bf16`` level; staged like `bf16_matmul`.

`f32_matmul(x, w, xla)` is the same for an f32 ``w [out, in]`` and an f32 ``x`` (the default
precision's linear layers and lm head, a tied embedding table included) through the package's f32
kernel (AVX-512F or AVX2 fused multiply-adds over tiles of weight and token rows, the weights
streamed once with software prefetch; sums in another order than XLA's, so equal to f32 summation
error), for `F32_MIN_ROWS` (1; 2 at ``avx2``) to `F32_MAX_ROWS` token rows.

`cache_attention(q, caches, mask, scale, xla, dtype)` is nx's attention over the KV cache
(``nx.ops.attention.attend`` over ``cache_windows``) through the package's attention kernels
(AVX-512F), or None where they do not apply. One query token a row (decode, and a prompt's last
layer) runs the decode kernel: scores, softmax and the weighted values of each cache row in one
pass, reading the window where it lies in the cache instead of a copy of it. More tokens (prompt
chunks; nx-kernels-cpu 0.9+) run the prompt kernel: tiles of 12 queries, each over the positions
its tokens' masks allow, with sums kept in registers. A query whose mask allows nothing (a left
pad's) gets the values' mean over the whole window, as an unblocked XLA softmax gives; XLA's
blocked prompt path (`attend`) gives the mean over the block's keys there, and neither reaches a
real token. Both need f32 caches with f32 queries, or bf16 caches (uint16 bits, `dtype` bf16) with
bf16 queries or f32 ones (``kv_dtype="bf16"`` under f32 compute), no ALiBi bias, every batch row
its own cache row, the AVX-512 levels (``scalar`` forced runs their scalar loops, for tests), and
`enabled`. Staged like
`bf16_matmul`: ``xla(q, caches, mask)`` off the cpu platform.

``NX_CPU_KERNELS``: ``auto`` (default: the best level the CPU has), ``off`` (the pure-XLA path),
or a level to force, ``avx512_bf16``, ``avx512_vnni``, ``avx2`` or ``scalar`` (never above the
CPU's; ``scalar`` runs the kernels without SIMD, for tests; the int8 kernels run ``avx512_bf16`` as
``avx512_vnni``, the bf16 kernel runs ``avx512_vnni`` on AVX-512F without its bf16 instructions, the
f32 kernel runs both as AVX-512F).
``NX_CPU_KERNELS_THREADS``: threads of XLA's intra-op pool a call may use (default 0: all). Both
are read when a program is traced, so they are part of the lowered program (and of its
compile-cache key).

Why: XLA:CPU has no fast int8 or bf16 matrix-vector kernel, nor a 4-bit one that reads the packed
weight once, and its f32 one streams the weights below the memory's speed (BENCHMARKS.md, "CPU
kernels (issue #22)", "Grouped and 4-bit CPU kernels", "bf16 CPU kernel", "f32 decode kernel").
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nx.errors import ConfigError

ENV = "NX_CPU_KERNELS"
THREADS_ENV = "NX_CPU_KERNELS_THREADS"
MODES = ("auto", "off", "avx512_bf16", "avx512_vnni", "avx2", "scalar")
#: Most token rows an s8 call sends to the kernel (decode and prompts): at every row count measured,
#: 1 to 2048 (batch 16 x 128-token prompts), its VNNI tiles beat XLA's int8 dot at the SmolLM2 and
#: 1B shapes (1.4-2.5x from 128 rows); more rows stay on XLA's dots, unmeasured (BENCHMARKS.md, "s8
#: kernel: register tiles and prompts").
MAX_ROWS = 2048
#: The same at the ``avx2`` (and ``scalar``) level: its 4 x 2 tiles beat XLA's int8 dot at decode's
#: 16 rows but not at 128 (3x slower on the EPYC, whose XLA dot runs AVX-512), so prompts stay on XLA.
AVX2_MAX_ROWS = 16
#: Most token rows a grouped call sends to the kernel (decode and prompts: up to 256 rows its int8
#: dots beat XLA's dequantized f32 dot at the 1B llama shapes; at 512 they tie, at 1024 XLA's GEMM
#: is ~10% faster; BENCHMARKS.md, "Grouped kernel: one activation term per block").
GROUPED_MAX_ROWS = 256
#: The same for 4-bit weights with groups of 32 (the kernel's panels of weight rows): at 512 and 1024
#: rows they ran 1.1-3.6x faster than XLA's dequantized dot at the 1B llama shapes (BENCHMARKS.md,
#: "4-bit interleaved layout"), and int8 ones in the panel layout 2.0-6.4x (BENCHMARKS.md, "Issue
#: #22's targets on this CPU, fifth round"); beyond, not measured.
PANEL_MAX_ROWS = 1024
#: Most token rows a bf16 call sends to the kernel at the ``avx512_bf16`` level with bf16 x (decode
#: batches and prompt chunks): its `vdpbf16ps` register tiles (below 16 rows) and prompt panels (from
#: 16) beat XLA's bf16 dot at every row count 1-128 on the 2-core EPYC; from 256 rows XLA's GEMM ties
#: or wins, and more rows stay on it (BENCHMARKS.md, "bf16 prompt panels").
BF16_MAX_ROWS = 128
#: Fewest token rows a gated MLP's first layer sends to the bf16 kernel with its silu and product
#: (`bf16_glu`): where the prompt panels start (nx-kernels-cpu's ``NX_KERNELS_PANEL_FROM`` default);
#: decode's few rows keep XLA's pass over their small output.
BF16_GLU_MIN_ROWS = 16
#: The same for an nx-kernels-cpu before 0.7 (register tiles only, f32 results): they beat XLA's
#: bf16 dot at 1-64 rows and tie from 128 (BENCHMARKS.md, "f32 kernel: register tiles, and the bf16
#: kernel to 64 rows").
BF16_TILES_MAX_ROWS = 64
#: The same at the lower levels (AVX-512F or AVX2 multiply-adds on widened weights, or f32 x):
#: measured faster than XLA up to decode's 16 rows only.
BF16_NARROW_MAX_ROWS = 16
#: Token rows an f32 call sends to the kernel, F32_MIN_ROWS ... F32_MAX_ROWS at the AVX-512 levels:
#: decode (one row included: 8% faster than XLA's matrix-vector product) and short prompt chunks,
#: where its register tiles beat XLA's f32 dots on the 2-core EPYC (1.1-2.7x); from 128 rows XLA's
#: GEMM ties (BENCHMARKS.md, "f32 kernel: register tiles, and the bf16 kernel to 64 rows", "One-row
#: f32 products").
F32_MIN_ROWS = 1
F32_MAX_ROWS = 64
#: The same at the ``avx2`` (and ``scalar``) level, whose 4 x 2 tiles were measured from 2 to 4 rows
#: (one row is faster on XLA's matrix-vector product there).
F32_AVX2_MIN_ROWS = 2
F32_AVX2_MAX_ROWS = 4

try:  # the optional distribution nx-kernels-cpu; importing it registers its FFI targets
    import nx_kernels_cpu as _kernels
except ImportError as exc:  # not installed (or not built for this machine): the XLA path
    _kernels = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None
#: What the installed package's bf16 kernel takes: results rounded to bf16 and prompt panels (0.7),
#: a gated MLP's first layer with its silu and product (0.8).
_BF16_PARAMS = inspect.signature(_kernels.bf16_matmul).parameters if _kernels is not None else {}
_BF16_OUT = "dtype" in _BF16_PARAMS
_BF16_GLU = "glu" in _BF16_PARAMS


def mode() -> str:
    """``$NX_CPU_KERNELS`` (default ``auto``); a `ConfigError` for any other value than `MODES`."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def isa() -> str | None:
    """The best kernel level of this CPU (``avx512_bf16``, ``avx512_vnni``, ``avx2``, ``scalar``), None
    without the package."""
    return None if _kernels is None else _kernels.isa()


def available() -> bool:
    """Whether the kernels can run here: the package imports and the CPU has AVX2 or better."""
    return isa() in ("avx512_bf16", "avx512_vnni", "avx2")


def unavailable_reason() -> str | None:
    """Why `available` is False (None when it is True): for test skips and `nx` diagnostics."""
    if _kernels is None:
        return f"nx-kernels-cpu is not installed ({_IMPORT_ERROR})"
    if not available():
        return f"this CPU has no AVX2 (kernel level {isa()!r})"
    return None


def package() -> str | None:
    """``"nx-kernels-cpu <version>"`` when the package is installed (its targets are then registered,
    so programs compiled with them run), else None. Compiled artifacts record it (`nx.executables`)."""
    return None if _kernels is None else f"nx-kernels-cpu {_kernels.__version__}"


def enabled() -> bool:
    """Whether int8, bf16 and f32 matmuls traced now use the kernels (available and not switched off)."""
    return available() and mode() != "off"


def describe() -> str:
    """One line for reports (`nx bench`): what int8, bf16 and f32 decode matmuls traced now run on."""
    if not available():
        return f"none ({unavailable_reason()})"
    level = mode()
    if level == "off":
        return f"off ({ENV}=off; {package()} installed)"
    return f"{package()}, {isa() if level == 'auto' else level}"


def _threads() -> int:
    value = os.environ.get(THREADS_ENV, "").strip() or "0"
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"{THREADS_ENV}={value!r}: expected a thread count >= 0 (0: every thread of XLA's pool)")
    return n


def s8_matmul(x: Any, w: Any) -> Any:
    """f32 ``x [m, k] @ W.T`` (``[m, n]``) for a `nx.ops.quant.QuantizedWeight` ``W`` through the
    kernel, or None where it does not apply (see the module docstring): the caller's XLA path then."""
    if not (w.int8_dot and w.bits == 8 and w.group_size is None and w.zero is None):
        return None
    if x.ndim != 2 or not enabled():
        return None
    level = mode()
    if x.shape[0] > (MAX_ROWS if _level().startswith("avx512") else AVX2_MAX_ROWS):
        return None
    return _kernels.s8_matmul(x, w.q, w.scale, level=None if level == "auto" else level, threads=_threads())


_FLOATS = ("float32", "float16")


def grouped_matmul(x: Any, w: Any) -> Any:
    """f32 ``x [m, k] @ W.T`` (``[m, n]``) for a grouped `nx.ops.quant.QuantizedWeight` ``W``
    through the kernel, or None where it does not apply (see the module docstring)."""
    gs = w.group_size
    if not (w.int8_dot and gs is not None and w.bits in (4, 8)):
        return None
    if gs % 32 or (512 % gs and gs % 512):  # the kernel's group sizes: 32 ... 512, multiples of 512
        return None
    if str(w.scale.dtype) not in _FLOATS or (w.zero is not None and str(w.zero.dtype) not in _FLOATS):
        return None
    rows = PANEL_MAX_ROWS if gs == 32 and (w.bits == 4 or w.panel) else GROUPED_MAX_ROWS
    if x.ndim != 2 or x.shape[0] > rows or x.shape[1] % gs or not enabled():
        return None
    level = None if mode() == "auto" else mode()
    return _kernels.grouped_matmul(x, w.q, w.scale, w.zero, bits=w.bits, group_size=gs, level=level, threads=_threads(),
                                   panel=w.panel)


def _level() -> str:
    """The level kernels traced now run: the one `NX_CPU_KERNELS` forces (never above the CPU's) or
    the CPU's best (the row limits depend on it: the lower levels' tiles are narrower)."""
    best = isa() or "scalar"
    level = best if mode() in ("auto", "off") else mode()
    order = MODES[2:][::-1]  # scalar, avx2, avx512_vnni, avx512_bf16
    return order[min(order.index(level), order.index(best))]


def _varying(a: Any) -> frozenset:
    """The shard_map mesh axes `a` varies over (empty outside shard_map)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _typed_like(y: Any, *operands: Any) -> Any:
    """`y` (a custom call's result, typed invariant under shard_map) typed varying over the mesh
    axes its operands vary over, as XLA's own ops (the other branch) are."""
    axes = frozenset().union(*map(_varying, operands)) - _varying(y)
    return jax.lax.pcast(y, tuple(sorted(axes)), to="varying") if axes else y


def _staged(kernel: Callable[..., Any], x: Any, w: Any, xla: Callable[[Any, Any], Any], rows: int,
            n: int | None = None) -> Any:
    """``kernel(x [rows, k], w, level=, threads=)`` in programs lowered for the cpu platform, typed and
    shaped as ``xla(x, w)`` (``[..., n]``, n the weight's rows unless given, in the kernel's dtype),
    which any other platform runs."""
    level, threads = mode(), _threads()

    def cpu(x, w):
        y = kernel(x.reshape(rows, -1), w, level=None if level == "auto" else level, threads=threads)
        return _typed_like(y, x, w).reshape(*x.shape[:-1], w.shape[0] if n is None else n)

    return jax.lax.platform_dependent(x, w, cpu=cpu, default=xla)


def _rows(x: Any, w: Any, dtypes: tuple, max_rows: int, min_rows: int = 1) -> int | None:
    """Token rows of ``x [..., k]`` for a kernel taking x in `dtypes` and a 2-D ``w [n, k]``, None
    where it does not apply (dtype, shape, rows outside [`min_rows`, `max_rows`], kernels off)."""
    if x.dtype not in dtypes or x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        return None
    rows = x.size // max(1, x.shape[-1])
    return rows if max(1, min_rows) <= rows <= max_rows and enabled() else None


def bf16_matmul(x: Any, w: Any, xla: Callable[[Any, Any], Any], dtype: Any = jnp.float32) -> Any:
    """``x @ w.T`` (``[..., n]``) in `dtype` for a bf16 array ``w [n, k]`` and a bf16 or f32 ``x [..., k]``:
    the kernel in programs lowered for the cpu platform (a bf16 `dtype` rounded by the kernel as it
    stores: no separate rounding pass), ``xla(x, w)`` (f32, then cast) on any other; None where the
    kernel does not apply (see the module docstring)."""
    if not (hasattr(w, "dtype") and w.dtype == jnp.bfloat16):
        return None
    out = jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 and _BF16_OUT else jnp.float32
    if x.dtype == jnp.bfloat16 and _level() == "avx512_bf16":
        limit = BF16_MAX_ROWS if _BF16_OUT else BF16_TILES_MAX_ROWS
    else:
        limit = BF16_NARROW_MAX_ROWS
    rows = _rows(x, w, (jnp.bfloat16, jnp.float32), limit)
    if rows is None:
        return None
    kernel = functools.partial(_kernels.bf16_matmul, dtype=out) if _BF16_OUT else _kernels.bf16_matmul
    return _staged(kernel, x, w, lambda x, w: xla(x, w).astype(out), rows).astype(dtype)


def bf16_glu(x: Any, w: Any, act: str, xla: Callable[[Any, Any], Any]) -> Any:
    """``act(x @ Wg.T) * (x @ Wu.T)`` (``[..., n / 2]``, bf16) for a bf16 array ``w = [Wg; Wu]`` (``[n, k]``, a
    gated MLP's fused first layer) and a bf16 ``x [..., k]``, through the bf16 kernel's prompt panels
    (each half's sums rounded to bf16, ``act`` in f32 rounded to bf16, the product rounded to bf16,
    as ``xla(x, w)``, the caller's path, rounds them), or None where that does not apply: ``act``
    ``silu``, `BF16_GLU_MIN_ROWS` to `BF16_MAX_ROWS` token rows at the ``avx512_bf16`` level, and
    `enabled`. Why: the pass of XLA's own over the products' output took 107 us a layer of a 128-token
    SmolLM2 prompt, for 0.2 M values (BENCHMARKS.md, "Gated MLP in the bf16 kernel")."""
    if act != "silu" or not _BF16_GLU or not (hasattr(w, "dtype") and w.dtype == jnp.bfloat16):
        return None
    if x.dtype != jnp.bfloat16 or _level() != "avx512_bf16" or w.ndim != 2 or w.shape[0] % 2:
        return None
    rows = _rows(x, w, (jnp.bfloat16,), BF16_MAX_ROWS, BF16_GLU_MIN_ROWS)
    if rows is None:
        return None
    kernel = functools.partial(_kernels.bf16_matmul, dtype=jnp.bfloat16, glu=act)
    return _staged(kernel, x, w, xla, rows, w.shape[0] // 2)


def f32_matmul(x: Any, w: Any, xla: Callable[[Any, Any], Any]) -> Any:
    """f32 ``x @ w.T`` (``[..., n]``) for an f32 array ``w [n, k]`` and an f32 ``x [..., k]``: the
    kernel in programs lowered for the cpu platform, ``xla(x, w)`` on any other; None where the
    kernel does not apply (see the module docstring)."""
    if not (hasattr(w, "dtype") and w.dtype == jnp.float32):
        return None
    wide = _level().startswith("avx512")
    rows = _rows(x, w, (jnp.float32,), F32_MAX_ROWS if wide else F32_AVX2_MAX_ROWS,
                 F32_MIN_ROWS if wide else F32_AVX2_MIN_ROWS)
    return None if rows is None else _staged(_kernels.f32_matmul, x, w, xla, rows)


def cache_attention(q: Any, caches: tuple, mask: Any, scale: float, xla: Callable[[Any, tuple, Any], Any],
                    dtype: Any = None) -> Any:
    """Attention of ``q [B, T, H, d]`` over one layer's whole ``(K, V)`` caches of `dtype` values
    (default: q's) where ``mask [B, T, W]`` allows (``[B, T, H * d]`` in q's dtype): the kernel in
    programs lowered for the cpu platform, ``xla(q, caches, mask)`` on any other; None where the
    kernel does not apply (see the module docstring). One token a row runs the decode kernel, more
    the prompt kernel."""
    k, v = caches
    b, t, h, d = q.shape
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    f32 = q.dtype == jnp.float32 and k.dtype == jnp.float32
    bf16 = q.dtype in (jnp.bfloat16, jnp.float32) and dtype == jnp.bfloat16 and k.dtype == jnp.uint16
    if not (f32 or bf16) or k.ndim != 3 or k.shape[0] % b or h % (k.shape[0] // b):
        return None
    kernel = getattr(_kernels, "decode_attention" if t == 1 else "prompt_attention", None)
    if not enabled() or kernel is None:  # (decode: nx-kernels-cpu 0.6+, prompts: 0.9+)
        return None
    if not _level().startswith("avx512") and mode() != "scalar":  # AVX2: not measured faster than XLA
        return None
    rows = k.shape[0]
    kvh = rows // b
    g = h // kvh
    level, threads = mode(), _threads()

    def cpu(q, k, v, mask):
        qr = q.reshape(b, t, kvh, g, d).transpose(2, 0, 3, 1, 4).reshape(rows, g * t, d)
        o = kernel(qr, k, v, mask, scale=scale, level=None if level == "auto" else level, threads=threads)
        o = _typed_like(o, q, k, v, mask).reshape(kvh, b, g, t, d).astype(q.dtype)
        return o.transpose(1, 3, 0, 2, 4).reshape(b, t, h * d)

    return jax.lax.platform_dependent(q, k, v, mask, cpu=cpu, default=lambda q, k, v, mask: xla(q, (k, v), mask))
