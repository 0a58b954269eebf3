"""Per-program XLA options: 512-bit vectors on AVX-512 CPUs only, exact bf16/f16 rounding on XLA's
own backends, and the user's XLA_FLAGS win."""

from __future__ import annotations

from nx import xla_options

EXACT = {"xla_allow_excess_precision": False}


def test_avx512_cpus_get_512_bit_vectors(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_options, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert xla_options.compiler_options("cpu") == {**EXACT, "xla_cpu_prefer_vector_width": 512}
    monkeypatch.setattr(xla_options, "cpu_flags", lambda: {"avx2"})
    assert xla_options.compiler_options("cpu") == EXACT


def test_cpu_decode_loops_keep_their_invariants_inside(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_options, "cpu_flags", lambda: {"avx2"})
    loop = xla_options.compiler_options("cpu", loop=True)
    assert loop == {**EXACT, "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    assert xla_options.compiler_options("gpu", loop=True) == EXACT
    monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=foo")
    assert "xla_disable_hlo_passes" not in xla_options.compiler_options("cpu", loop=True)


def test_other_platforms_and_user_flags_are_left_alone(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_options, "cpu_flags", lambda: {"avx512f"})
    assert xla_options.compiler_options("gpu") == EXACT
    assert xla_options.compiler_options("neuron") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256 --xla_allow_excess_precision=true")
    assert xla_options.compiler_options("cpu") == {}
