"""The Python API (``cowfs.overlay``) and the pytest plugin's fixtures, on real mounts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import build_layer, mounted_fstype, wait_until
from tools_support import unchanged

import cowfs
from cowfs.tools.walk import Added, Deleted, Kind, Modified


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return build_layer(tmp_path / "dataset", {"a.csv": None, "b.csv": None, "sub/c.csv": None},
                       "data")


def test_overlay_with_a_temporary_upper(dataset: Path) -> None:
    with unchanged(dataset, "the dataset"):
        with cowfs.overlay(dataset) as view:
            assert mounted_fstype(view.path) == "fuse.cowfs"
            assert (view.path / "a.csv").read_text() == "data:a.csv"
            (view.path / "a.csv").write_text("rewritten")
            (view.path / "b.csv").unlink()
            (view.path / "new.csv").write_text("new")
            assert view.diff() == [Modified("a.csv", Kind.FILE, True), Deleted("b.csv", Kind.FILE),
                                   Added("new.csv", Kind.FILE)]
            assert view.summary() == "1 added, 1 modified, 1 deleted"
            scratch = view.upper.parent
        assert mounted_fstype(view.path) is None
        assert not scratch.exists()


def test_overlay_unmounts_on_error_and_discard_resets(dataset: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    with unchanged(dataset, "the dataset"):
        with pytest.raises(RuntimeError, match="boom"), cowfs.overlay(dataset, upper) as view:
            (view.path / "x").write_text("x")
            view.discard()
            assert view.diff() == []
            assert not (view.path / "x").exists()
            (view.path / "y").write_text("y")
            raise RuntimeError("boom")
        assert mounted_fstype(view.path) is None
    assert (upper / "y").read_text() == "y"  # a given upper is kept by default


def test_overlay_commit_into_the_base(dataset: Path) -> None:
    with cowfs.overlay(dataset) as view:
        (view.path / "sub/c.csv").write_text("fixed")
        os.rename(view.path / "sub", view.path / "moved")
        assert view.commit() == "1 modified, 1 renamed"
        assert view.diff() == []
        assert (view.path / "moved/c.csv").read_text() == "fixed"
    assert (dataset / "moved/c.csv").read_text() == "fixed"
    assert not (dataset / "sub").exists()


def test_overlay_of_several_lowers_and_bad_input(tmp_path: Path, dataset: Path) -> None:
    top = build_layer(tmp_path / "top", {"a.csv": "top"}, "top")
    with cowfs.overlay([top, dataset]) as view:
        assert (view.path / "a.csv").read_text() == "top"
        assert (view.path / "b.csv").exists()
        with pytest.raises(cowfs.CowfsError, match="several lowers"):
            view.commit()
    with pytest.raises(cowfs.CowfsError, match="does not exist"), \
            cowfs.overlay(tmp_path / "missing"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(cowfs.CowfsError, match=r"mountpoint .* is not a directory"), \
            cowfs.overlay(dataset, at=tmp_path / "file"):
        pass
    with unchanged(dataset, "the dataset"), \
            pytest.raises(cowfs.CowfsError, match="inside lower"), \
            cowfs.overlay(dataset, dataset / "changes"):
        pass
    assert not (dataset / "changes").exists()


def test_overlay_creates_a_missing_mountpoint_and_removes_it(dataset: Path,
                                                             tmp_path: Path) -> None:
    with cowfs.overlay(dataset, at=tmp_path / "new/view") as view:
        assert (view.path / "a.csv").read_text() == "data:a.csv"
    assert not (tmp_path / "new").exists()


def test_api_started_next_to_a_folder_named_cowfs(dataset: Path, tmp_path: Path) -> None:
    """The daemon is started as ``python -P -m cowfs``: a folder named cowfs in the caller's
    working directory is not imported instead of cowfs."""
    decoy = tmp_path / "project"
    (decoy / "cowfs").mkdir(parents=True)
    (decoy / "cowfs/__init__.py").write_text("raise ImportError('the wrong cowfs')\n")
    script = tmp_path / "use_api.py"
    script.write_text(textwrap.dedent(f"""\
        import cowfs
        with cowfs.overlay({str(dataset)!r}) as view:
            print((view.path / "a.csv").read_text())
        """))
    env = {**os.environ, "PYTHONPATH": str(Path(cowfs.__file__).parent.parent)}
    result = subprocess.run([sys.executable, str(script)], cwd=decoy, env=env,
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "data:a.csv\n"


def test_cowfs_overlay_fixture(cowfs_overlay, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    view = cowfs_overlay(dataset)
    (view.path / "scratch").write_text("x")
    assert [c.path for c in view.diff()] == ["scratch"]
    assert not (dataset / "scratch").exists()


PLUGIN_TEST = '''
import pytest

@pytest.mark.cowfs_dataset("{dataset}")
def test_marker(cowfs_view):
    (cowfs_view.path / "a.csv").write_text("scribbled")
    (cowfs_view.path / "sub" / "c.csv").unlink()
    assert [c.path for c in cowfs_view.diff()] == ["a.csv", "sub/c.csv"]

def test_ini(cowfs_view):
    assert (cowfs_view.path / "b.csv").read_text() == "data:b.csv"
    (cowfs_view.path / "b.csv").unlink()
'''


def test_pytest_plugin_from_a_test_suite(tmp_path: Path, dataset: Path) -> None:
    """The entry-point plugin, as another project's test suite would use it."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_data.py").write_text(PLUGIN_TEST.format(dataset=dataset))
    (suite / "pytest.ini").write_text(textwrap.dedent(f"""\
        [pytest]
        cowfs_dataset = {os.path.relpath(dataset, suite)}
        """))
    with unchanged(dataset, "the dataset"):
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 str(suite)], cwd=suite, capture_output=True, text=True,
                                timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_a_busy_view_is_detached_lazily_on_exit(dataset: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A process left inside the view (a background job of the caller's) keeps it busy: after
    a few seconds of retries the view is detached lazily, with a warning, so it never outlives
    the ``with`` block; its daemon exits once the last process leaves."""
    from cowfs.core import lifecycle, mounts

    with cowfs.overlay(dataset, at=tmp_path / "view") as view:
        state = mounts.load_state(view.path)
        assert state is not None
        lingering = subprocess.Popen(["sleep", "60"], cwd=view.path)
    try:
        assert mounted_fstype(tmp_path / "view") is None
        assert any("detached lazily" in r.getMessage() for r in caplog.records
                   if r.name == lifecycle.__name__)
    finally:
        lingering.kill()
        lingering.wait()
    assert wait_until(lambda: not Path(f"/proc/{state.pid}").exists(), timeout=30)
