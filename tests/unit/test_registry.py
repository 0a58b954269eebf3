"""Plugin discovery, in-process registration, failure isolation and `nx list-models`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

import nx
from nx.cli import main
from nx.family import Family, tensor
from nx.registry import Registry
from nx.spec import ModelSpec


def _stub_family(name: str) -> Family:
    def spec(cfg):
        return ModelSpec(model_type="stub", vocab_size=8, hidden_size=4, n_layers=1, n_heads=1, head_dim=4, intermediate_size=8)

    return Family(name=name, model_types=(f"{name}-type",), spec_from_config=spec, weights=lambda s: {"embed.w": tensor("e", (8, 4))})


class StubPlugin:
    def __init__(self, *names: str) -> None:
        self.names = names

    @nx.hookimpl
    def nx_register_families(self, register):
        for n in self.names:
            register(_stub_family(n))


def test_installed_entry_points_are_discovered():
    reg = Registry()
    fams = reg.families()
    assert {"llama", "gpt2"} <= set(fams)
    assert fams["llama"].distribution == "nx-plugin-llama"
    assert fams["llama"].version
    assert reg.get("llama").model_types == ("llama",)


def test_stub_plugin_registered_in_process():
    reg = Registry(load_entry_points=False)
    reg.register(StubPlugin("toy", "toy2"), name="stub")
    assert set(reg.families()) == {"toy", "toy2"}
    assert reg.get("toy").plugin == "stub"
    assert reg.for_model_type("toy2-type").name == "toy2"


def test_duplicate_family_names_name_both_plugins():
    reg = Registry(load_entry_points=False)
    reg.register(StubPlugin("toy"), name="first")
    reg.register(StubPlugin("toy"), name="second")
    with pytest.raises(nx.PluginError, match="first") as err:
        reg.families()
    assert "second" in str(err.value) and "'toy'" in str(err.value)


def test_unknown_family_lists_installed_and_what_to_install():
    reg = Registry()
    with pytest.raises(nx.UnknownFamilyError) as err:
        reg.get("mamba")
    msg = str(err.value)
    assert "llama" in msg and "gpt2" in msg and "pip install nx-plugin-mamba" in msg


def test_plugin_raising_in_hook_is_skipped_with_warning():
    class Exploding:
        @nx.hookimpl
        def nx_register_families(self, register):
            raise RuntimeError("boom")

    reg = Registry(load_entry_points=False)
    reg.register(Exploding(), name="exploding")
    reg.register(StubPlugin("toy"), name="ok")
    with pytest.warns(RuntimeWarning, match="exploding.*boom"):
        assert set(reg.families()) == {"toy"}


def _broken_dist(tmp_path) -> str:
    """An installed-looking distribution whose nx plugin module does not import."""
    info = tmp_path / "nx_plugin_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nx-plugin-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[nx.plugins]\nbroken = nx_broken_plugin\n")
    (tmp_path / "nx_broken_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    return str(tmp_path)


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_broken_installed_plugin_is_reported_not_fatal(tmp_path):
    res = _run(["-m", "nx.cli", "list-models"], {"PYTHONPATH": _broken_dist(tmp_path), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "llama" in res.stdout and "gpt2" in res.stdout
    assert "broken" in res.stderr + res.stdout and "broken on purpose" in res.stderr + res.stdout


def test_nx_plugins_env_restricts_loading(tmp_path):
    code = "from nx.registry import Registry; print(sorted(Registry().families()))"
    res = _run(["-c", code], {"NX_PLUGINS": "llama", "PYTHONPATH": _broken_dist(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['llama']"
    assert "broken" not in res.stderr  # not even imported
    res = _run(["-c", code], {"NX_PLUGINS": ""})
    assert res.stdout.strip() == "[]"


def test_list_models_output():
    res = CliRunner().invoke(main, ["list-models"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("llama", "nx-plugin-llama", "gpt2", "nx-plugin-gpt2", "HF model types"):
        assert text in res.output


def test_list_models_imports_neither_jax_nor_torch():
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        from nx.cli import main
        res = CliRunner().invoke(main, ["list-models"])
        assert res.exit_code == 0, res.output
        heavy = sorted(m for m in ("jax", "torch", "transformers") if m in sys.modules)
        print(heavy)
        """
    )
    res = _run(["-c", code], {})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
