"""nx-core plus one plugin installed into a fresh virtualenv: only that family is listed and loads;
the others fail with the error that names the plugin to install.

Our distributions are really built and installed (pip, non-editable) into a new venv. Their
third-party dependencies (jax, torch, transformers, ...) are borrowed from this environment through
a directory of links, so the test needs no multi-GB download; nx's own packages are left out of it.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.cases.gpt2 import CASES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OURS = ("nx", "nx_", "_nx", "__editable__", "nx_core", "nx_plugin")


def _deps_dir(tmp: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.startswith(OURS) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    return deps


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolated")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed_deps.pth").write_text(str(_deps_dir(tmp)) + "\n")
    res = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", str(ROOT / "core"), str(ROOT / "plugins" / "gpt2")],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return py


def _run(py, *args, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NX_PLUGINS")}
    return subprocess.run([str(py), *args], capture_output=True, text=True, timeout=600, env=env, cwd="/", **kw)


def test_only_the_installed_family_is_listed(fresh_env):
    res = _run(fresh_env, "-m", "nx.cli", "list-models")
    assert res.returncode == 0, res.stderr
    assert "gpt2" in res.stdout and "nx-plugin-gpt2" in res.stdout
    for other in ("llama", "opt", "bloom", "gptneox", "gptj"):
        assert other not in res.stdout
    where = _run(fresh_env, "-c", "import nx, nx_gpt2; print(nx.__file__); print(nx_gpt2.__file__)")
    assert str(ROOT) not in where.stdout, "the fresh venv must use its own installed copy"


def test_installed_family_loads_and_others_name_their_plugin(fresh_env, saved_case, tmp_path):
    hf, path = saved_case(CASES[0])
    code = f"""
import nx
m = nx.load("gpt2", {path!r}, n_positions=32, progress=False)
print(m.generate([[5, 6, 7]], max_new_tokens=4).shape)
try:
    nx.load("llama", {path!r})
except nx.UnknownFamilyError as e:
    print("ERR", e)
"""
    res = _run(fresh_env, "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch.Size([1, 7])" in res.stdout
    assert "ERR" in res.stdout and "pip install nx-plugin-llama" in res.stdout and "gpt2" in res.stdout
