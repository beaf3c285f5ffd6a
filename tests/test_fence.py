"""Every library internal the project relies on is still there with the shape it is used with (pipelines.fence).

These tests FAIL when TRL or transformers move or reshape one of them: a CPU speed-up that silently stops working,
or a resume that silently trains on other batches, must not reach a release unnoticed.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest
from packaging.specifiers import SpecifierSet

from pipelines import fence


@pytest.mark.parametrize("internal", fence.INTERNALS, ids=lambda i: i.key)
def test_internal_is_in_place(internal: fence.Internal) -> None:
    assert internal.problem() is None


@pytest.mark.parametrize("library", sorted(fence.SUPPORTED))
def test_installed_versions_are_the_tested_ones(library: str) -> None:
    version = importlib.metadata.version(library)
    assert version in SpecifierSet(fence.SUPPORTED[library]), \
        f"{library} {version} is outside the tested range {fence.SUPPORTED[library]}: re-check pipelines/fence.py"


def test_pyproject_pins_the_tested_ranges() -> None:
    import tomllib

    from tests.conftest import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for library, spec in fence.SUPPORTED.items():
        assert any(d.replace(" ", "").startswith(library + spec.replace(" ", "")) for d in deps), (library, deps)


@pytest.mark.parametrize("internal", fence.INTERNALS, ids=lambda i: i.key)
def test_a_moved_internal_is_reported(internal: fence.Internal, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rename each internal in its module (as a new release might): the fence names it, and get() refuses it."""
    module_name, _, attribute = internal.path.partition(":")
    owner = importlib.import_module(module_name)
    *parents, leaf = attribute.split(".")
    for part in parents:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, f"{leaf}_renamed", getattr(owner, leaf), raising=False)
    monkeypatch.delattr(owner, leaf)
    problem = internal.problem()
    assert problem is not None and internal.path in problem and "relies on it for" in problem
    assert any(internal.path in p for p in fence.problems())
    with pytest.raises(fence.InternalMoved):
        fence.get(internal.key)
    assert not fence.available(internal.key)


def test_a_reshaped_internal_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda: False)  # lost its `device` parameter
    assert "lost the parameters device" in fence.BY_KEY["use_triton"].problem()


def test_patching_is_idempotent_and_keeps_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    # start from TRL's own function (training may have patched it already); restored after the test
    original = getattr(trl_utils._use_triton, "_fenced_original", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", original)
    assert fence.patch_module_function("use_triton", lambda f: lambda device: True)
    patched = trl_utils._use_triton
    assert patched is not original and patched._fenced_original is original
    assert fence.patch_module_function("use_triton", lambda f: lambda device: False)
    assert trl_utils._use_triton is patched
