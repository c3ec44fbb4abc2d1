"""An upper remembers the lower stack it was made on (issue 9, section 5), the offline tools read
the hard-link index of a mount made with ``--work`` (issue 10, section 2), and the package's
structure: importing cowfs loads neither the API nor the walk, and the daemon started by the API
does not depend on the caller's working directory."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import cowfs_mount, find_cowfs, tree_state
from tools_support import Workspace, assert_user_error, cowfs, unchanged, workspace

__all__ = ["workspace"]

WORKTREE = Path(__file__).resolve().parent.parent


def stack_record(upper: Path) -> dict[str, object]:
    return json.loads(os.getxattr(upper, "user.cowfs.stack"))  # type: ignore[no-any-return]


# --- the recorded stack --------------------------------------------------------------------------


def test_a_mount_records_its_stack_and_diff_uses_it_after_unmount(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new\n")
        (ws.mnt / "b.txt").unlink()
    st = os.stat(ws.base)
    assert stack_record(ws.upper) == {
        "version": 1, "work": None,
        "lowers": [{"path": str(ws.base.resolve()), "dev": st.st_dev, "ino": st.st_ino}]}
    # The README's example: no --lower after unmount.
    diff = cowfs("diff", ws.upper)
    assert (diff.status, diff.out) == (0, "D  b.txt\nA  new.txt\n"), diff
    assert cowfs("check", ws.upper).status == 0
    out = ws.fresh("out")
    assert cowfs("export", ws.upper, "-o", out / "layer.tar").status == 0
    with tarfile.open(out / "layer.tar") as tar:
        assert sorted(n.removeprefix("./") for n in tar.getnames()) == [".wh.b.txt", "new.txt"]


def test_a_mount_over_another_stack_is_refused_unless_relocated(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new\n")
    other = ws.fresh("other")
    before = tree_state(ws.upper)  # ctimes included: a refused mount writes nothing at all
    refused = cowfs("mount", other, ws.upper, ws.mnt)
    assert_user_error(refused, "another lower stack", str(ws.base), str(other), "-o relocate")
    refused = cowfs("mount", f"{ws.base}:{other}", ws.upper, ws.mnt)
    assert_user_error(refused, "1 lower layer (", "not 2")
    assert tree_state(ws.upper) == before
    # A deliberate move: the same content at a new place.
    moved = ws.root / "moved"
    os.rename(ws.base, moved)
    assert_user_error(cowfs("mount", moved, ws.upper, ws.mnt), "was '", "now it is '")
    assert_user_error(cowfs("diff", ws.upper), "does not exist")  # the recorded path is gone
    with cowfs_mount([moved], ws.upper, ws.mnt, options=["relocate"]):
        assert (ws.mnt / "new.txt").read_text() == "new\n"
    assert stack_record(ws.upper)["lowers"][0]["path"] == str(moved)  # type: ignore[index]
    assert cowfs("diff", ws.upper).out == "A  new.txt\n"
    os.rename(moved, ws.base)  # for the workspace fixture's teardown


def test_a_commit_into_another_base_is_refused_unless_relocated(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new\n")
    other = ws.fresh("other")
    with unchanged(other, "the other base"), unchanged(ws.upper, "the upper"):
        assert_user_error(cowfs("commit", ws.upper, "--into", other, "--yes"),
                          "another lower stack", "--relocate")
    done = cowfs("commit", ws.upper, "--into", other, "--relocate", "--yes")
    assert done.status == 0, done
    assert (other / "new.txt").read_text() == "new\n"


def test_a_read_only_mount_records_nothing(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt, options=["ro"]):
        assert (ws.mnt / "a.txt").exists()
    assert "user.cowfs.stack" not in os.listxattr(ws.upper)
    # Over a recorded stack, a read-only mount verifies it but does not rewrite it.
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        pass
    record = os.getxattr(ws.upper, "user.cowfs.stack")
    other = ws.fresh("other")
    with cowfs_mount([other], ws.upper, ws.mnt, options=["ro", "relocate"]):
        pass
    assert os.getxattr(ws.upper, "user.cowfs.stack") == record


def test_a_malformed_record_is_a_clear_error(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        pass
    os.setxattr(ws.upper, "user.cowfs.stack", b'{"version": 1, "lowers": "x"}')
    assert_user_error(cowfs("diff", ws.upper), "malformed stack record", "--lower")
    assert cowfs("diff", "--lower", ws.base, ws.upper).status == 0


# --- the work directory of a mount made with --work ----------------------------------------------


def test_diff_and_export_read_the_index_of_a_mount_with_its_own_work_dir(
        workspace: Workspace) -> None:
    """A lower hard link written through a mount made with --work: the other name is served
    from WORK/index, which diff, export and commit must read (walk's ``work`` was never
    passed)."""
    ws = workspace
    work = ws.fresh("work")
    with cowfs_mount([ws.base], ws.upper, ws.mnt, work=work), \
            open(ws.mnt / "hard/one", "a") as f:
        f.write("more\n")
    assert not (ws.upper / "hard/two").exists()  # served from the index
    assert os.listdir(work / "index")
    for args in (["diff", ws.upper], ["diff", "--lower", ws.base, ws.upper]):
        diff = cowfs(*args)
        assert diff.out == "M  hard/one\nM  hard/two\n", (args, diff)
    out = ws.fresh("out")
    assert cowfs("export", ws.upper, "-o", out / "layer.tar").status == 0
    with tarfile.open(out / "layer.tar") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert sorted(set(members) - {"hard"}) == ["hard/one", "hard/two"]
        one, two = members["hard/one"], members["hard/two"]
        first, second = (one, two) if one.isfile() else (two, one)
        assert second.islnk()
        assert second.linkname.removeprefix("./") == first.name.removeprefix("./")
        data = tar.extractfile(first)
        assert data is not None
        assert data.read() == b"base:hard/one" + b"more\n"
    assert cowfs("commit", ws.upper, "--into", ws.base, "--yes").status == 0
    assert (ws.base / "hard/two").read_text() == "base:hard/one" + "more\n"
    assert (ws.base / "hard/one").stat().st_ino == (ws.base / "hard/two").stat().st_ino
    assert not (work / "index").exists()  # emptied with the upper: it named copies now gone


# --- structure -----------------------------------------------------------------------------------


def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    return subprocess.run([sys.executable, "-P", "-c", code], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False, timeout=60)


def test_importing_cowfs_or_the_daemon_loads_neither_the_api_nor_the_walk() -> None:
    result = _python("import sys, cowfs, cowfs.daemon.mount, cowfs.cli\n"
                     "print(sorted(m for m in sys.modules if m in ('cowfs.tools.api', "
                     "'cowfs.tools.walk', 'cowfs.tools.run', 'cowfs.tools.workspace')))\n"
                     "assert cowfs.overlay is not None and cowfs.CowfsError is not None\n"
                     "print('cowfs.tools.api' in sys.modules)")
    assert result.stdout == "[]\nTrue\n", result.stderr


#: The package's folders, each importing only the folders listed for it (and itself): the shared
#: layer-format core below both stacks, the daemon and the offline tools side by side on it, the
#: command line and the package's own entry points on top (docs/architecture.md).
FOLDERS = {"core": set(), "daemon": {"core"}, "tools": {"core"}, "": {"core", "daemon", "tools"}}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDERS) else ""


def _import_graph() -> dict[str, set[str]]:
    """Which cowfs modules (and pyfuse3/trio) each cowfs module imports, anywhere in it (also
    inside functions), leaving out ``if TYPE_CHECKING:`` blocks."""
    files = list((WORKTREE / "cowfs").rglob("*.py"))
    paths = {".".join(("cowfs", *p.with_suffix("").relative_to(WORKTREE / "cowfs").parts))
             .removesuffix(".__init__"): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # drop type-only imports
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                node.body = []
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else node.module or ""
                found |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names))
                          if t in paths or t in ("pyfuse3", "trio")}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in paths or a.name in
                          ("pyfuse3", "trio")}
        packages = {"cowfs", *(f"cowfs.{f}" for f in FOLDERS if f)}
        graph[name] = found - {name} - packages  # a package's own __init__
    return graph


def test_imports_point_down() -> None:
    """No import cycle between cowfs's modules; each folder imports only the folders below it
    (the daemon and the tools never each other); neither the core, the model nor the offline
    tools need FUSE."""
    graph = _import_graph()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done or name not in graph:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
    across = {f"{name} -> {dep}" for name, deps in graph.items() for dep in deps
              if dep.startswith("cowfs") and _folder(dep) != _folder(name)
              and _folder(dep) not in FOLDERS[_folder(name)]}
    assert across == set()
    assert {_folder(n) for n in graph} == set(FOLDERS)  # every folder is there, none unknown
    for top in ("cowfs.daemon.vfs", "cowfs.tools.api", "cowfs.core.lifecycle",
                "cowfs.tools.workspace", "cowfs.tools.check", "cowfs.tools.oci",
                "cowfs.tools.status"):
        reached, pending = set(), [top]
        while pending:
            name = pending.pop()
            if name not in reached:
                reached.add(name)
                pending += graph.get(name, set())
        assert not reached & {"pyfuse3", "trio"}, top
    # The mount lifecycle has one home, below the command line, the API and the tools.
    assert graph["cowfs.core.lifecycle"] <= {"cowfs.core.mounts", "cowfs.core.errors"}
    assert {"cowfs.core.lifecycle"} <= graph["cowfs.cli"] & graph["cowfs.tools.api"]


#: What resolves a name through the layers, verifies an origin or finds a metacopy file's data:
#: lookup's work, which the daemon does in one module (daemon/namei.py, docs/architecture.md).
LOOKUP_CALLS = {"resolve", "exists_below", "probe_path", "merged_lookup", "verify", "find_data"}


def test_the_daemon_looks_names_up_in_one_module() -> None:
    """Only daemon/namei.py calls the lookup functions of the core (the kernel's namei.c); the
    other daemon modules ask it (copy-up, the namespace changes, the facade). Probing one real
    directory (``probe``: the upper name a change takes) is not a lookup of the merged view."""
    callers: dict[str, set[str]] = {}
    for path in sorted((WORKTREE / "cowfs/daemon").glob("*.py")):
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("core."):
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    node.value.id in ("resolve", "origins", "metacopy")):
                used.add(node.attr)
        if used & LOOKUP_CALLS:
            callers[path.name] = used & LOOKUP_CALLS
    assert set(callers) == {"namei.py"}, callers


#: The one owner of a partial file's state in the daemon (docs/architecture.md), and what else may
#: touch cowfs.core.partial: mount.py names the option's default, which is no state.
PARTIAL_OWNER = "upperdata.py"
PARTIAL_ALLOWED = {"mount.py": {"import partial", "DEFAULT_MIN_SIZE"}}


def partial_state_users(daemon: Path) -> dict[str, set[str]]:
    """What each module of ``daemon`` (a folder like cowfs/daemon) other than the owner touches of
    a partial file's state: names it uses of ``core.partial`` (its ``PartialFile``, ``DataMap``,
    the map's reading and filling), the inode's record (``partial_data``: read only by the
    owner, and by inodes.py through ``self``, which keeps it), and, in inodes.py, any ``Inode``
    slot or method about partial files besides that one reference."""
    found: dict[str, set[str]] = {}
    for path in sorted(daemon.glob("*.py")):
        if path.name == PARTIAL_OWNER:
            continue
        used: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if module.endswith("core.partial"):
                    used |= {f"import {a.name}" for a in node.names}
                elif module.endswith("core"):
                    used |= {"import partial" for a in node.names if a.name == "partial"}
            elif isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id == "partial":
                    used.add(node.attr)
                elif node.attr == "partial_data" and not (
                        path.name == "inodes.py" and isinstance(node.value, ast.Name)
                        and node.value.id == "self"):
                    used.add("partial_data")
                elif node.attr in ("PartialFile", "PartialData"):
                    used.add(node.attr)
                elif node.attr in ("partial", "unsaved", "persist_partial") and (
                        _names_an_inode(node.value)):
                    used.add(f"inode.{node.attr}")
            elif isinstance(node, ast.Name) and node.id in ("PartialFile", "DataMap"):
                used.add(node.id)
            elif isinstance(node, ast.ClassDef) and node.name == "Inode":
                for item in node.body:
                    names = [t.id for t in getattr(item, "targets", ()) if isinstance(t, ast.Name)]
                    if "__slots__" in names and isinstance(item, ast.Assign):
                        slots = ast.literal_eval(item.value)
                        used |= {f"Inode slot {n}" for n in slots
                                 if ("partial" in n or "retired" in n) and n != "partial_data"}
                    elif isinstance(item, ast.FunctionDef) and (
                            "partial" in item.name or item.name == "unsaved"):
                        used.add(f"Inode.{item.name}")
        used -= PARTIAL_ALLOWED.get(path.name, set())
        if used:
            found[path.name] = used
    return found


def _names_an_inode(node: ast.expr) -> bool:
    """``inode`` or ``….inode``: what an ``Inode`` is called wherever the daemon uses one."""
    return (isinstance(node, ast.Name) and node.id == "inode") or (
        isinstance(node, ast.Attribute) and node.attr == "inode")


def test_the_partial_file_state_has_one_owner() -> None:
    """A partial file's state (its open ``PartialFile``, its map, what of it is unsaved, when it
    is persisted, reads that combine the two copies, truncation, completion) is daemon/
    upperdata.py's alone (issue 19): the other daemon modules ask its record (``PartialData``)
    or ``UpperData``, never ``core.partial`` or the record's slot on the inode, and the ``Inode``
    keeps only that one reference (no ``partial``, ``unsaved``, ``persist_partial``, ...)."""
    assert partial_state_users(WORKTREE / "cowfs/daemon") == {}


def test_every_module_imports_first_without_a_cycle() -> None:
    """Each module imported first in a fresh interpreter: a cycle shows up as an ImportError
    for some order."""
    modules = sorted(".".join(("cowfs", *p.with_suffix("").relative_to(WORKTREE / "cowfs").parts))
                     .removesuffix(".__init__") for p in (WORKTREE / "cowfs").rglob("*.py")
                     if p.stem != "__main__")
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    # The interpreters are independent: as many at once as there are cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda name: _python(code.replace("sys.argv[1:]", repr([name]))),
                           modules)
        for name, result in zip(modules, results, strict=True):
            assert result.returncode == 0, (name, result.stderr)


def test_cowfs_run_started_next_to_a_folder_named_cowfs(workspace: Workspace) -> None:
    """``python -m cowfs`` puts the working directory first on sys.path: a folder named cowfs
    there was imported instead of cowfs (ImportError)."""
    ws = workspace
    decoy = ws.fresh("project")
    (decoy / "cowfs").mkdir()
    (decoy / "cowfs/__init__.py").write_text("raise ImportError('the wrong cowfs')\n")
    result = subprocess.run([str(find_cowfs()), "run", "--at", str(ws.mnt), str(ws.base), "--",
                             "cat", "a.txt"], cwd=decoy, capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "base:a.txt"
