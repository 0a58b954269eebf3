"""Checks shared by the tests of the kernels staged with `jax.lax.platform_dependent` (the bf16 and
f32 kernels behind `nx.ops.linear.project`): programs for other platforms keep XLA's dot, and the
kernel inside scan and shard_map equals the XLA path."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from nx.ops import cpu_kernels

linear = importlib.import_module("nx.ops.linear")  # `nx.ops.linear` is also the function


def assert_xla_off_the_cpu(target: str, x, w, platform: str) -> None:
    """A program exported for `platform` never calls the cpu-only FFI `target`; one exported for cpu
    and `platform` holds both (a conditional on the platform, resolved when compiled)."""
    f = jax.jit(lambda x, w: linear.project(x, w, x.dtype))
    text = jax.export.export(f, platforms=[platform])(x, w).mlir_module()
    assert target not in text and "dot_general" in text
    allow = [jax.export.DisabledSafetyCheck.custom_call(target)]
    both = jax.export.export(f, platforms=["cpu", platform], disabled_checks=allow)(x, w).mlir_module()
    assert target in both


def scan_and_shard_map(target: str, dtype, rows: int, monkeypatch) -> tuple[list, list]:
    """Layers scanned over stacked `dtype` weights, a column- and a row-parallel weight under
    shard_map over 2 devices, each run through the kernel (`target` in the lowered program) and
    through XLA (``NX_CPU_KERNELS=off``); returns their f32 outputs (kernel, XLA)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((rows, 128)), dtype)
    stacked = jnp.asarray(rng.standard_normal((3, 128, 128)) / 11, dtype)

    def run(x, stacked):
        def body(h, w):
            return jnp.tanh(linear.project(h, w, jnp.float32)).astype(dtype), None

        return jax.lax.scan(body, x, stacked)[0].astype(jnp.float32)

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

    def column(x, w):
        f = jax.shard_map(lambda x, w: linear.project(x, w, jnp.float32), mesh=mesh,
                          in_specs=(PartitionSpec(), PartitionSpec("tp")), out_specs=PartitionSpec(None, "tp"))
        return f(x, w)

    def row(x, w):
        f = jax.shard_map(lambda x, w: linear.row_parallel_linear(x, {"w": w}, "tp").astype(jnp.float32), mesh=mesh,
                          in_specs=(PartitionSpec(None, "tp"), PartitionSpec(None, "tp")), out_specs=PartitionSpec())
        return f(x, w)

    fns = [(run, stacked), (column, stacked[0]), (row, stacked[1])]
    got = [np.asarray(jax.jit(f)(x, w)) for f, w in fns]
    for f, w in fns:
        assert target in jax.jit(f).lower(x, w).as_text()
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    return got, [np.asarray(jax.jit(f)(x, w)) for f, w in fns]


def assert_chosen_when_lowered(target: str, lowered, x, w, levels: list[str], monkeypatch) -> None:
    """`lowered(x, w)` (a program's text) calls `target` at every level in `levels` and not with
    ``NX_CPU_KERNELS=off``; the compiled program holds no platform conditional (the choice is made
    when lowering)."""
    compiled = jax.jit(lambda x, w: linear.project(x, w, x.dtype)).lower(x, w).compile().as_text()
    assert "conditional" not in compiled
    for level in levels:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        assert target in lowered(x, w)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert target not in lowered(x, w)


def assert_exact_integer_sums(kernel, dtype, k: int, level: str) -> None:
    """Small integers in `dtype`: every partial sum is exact in f32, whatever the order, so
    ``kernel(x, w, level=)`` equals the f64 product bit for bit."""
    rng = np.random.default_rng(2)
    m, n = 9, 70
    x = jnp.asarray(rng.integers(-8, 9, (m, k)), dtype)
    w = jnp.asarray(rng.integers(-8, 9, (n, k)), dtype)
    got = np.asarray(jax.jit(lambda x, w: kernel(x, w, level=level))(x, w))
    np.testing.assert_array_equal(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T)
