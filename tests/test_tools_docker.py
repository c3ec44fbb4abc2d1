"""``docker load`` and ``podman load`` of what ``cowfs image export`` writes (issue 21). Docker's
is opt-in, since it needs a Docker engine, which ``make test`` does not start; podman's runs
where podman is installed (it is not a required package: skipped, with the reason, elsewhere).

``COWFS_TEST_DOCKER=1`` turns it on (``make docker-load-test`` installs docker.io where it is
missing and runs this file so). The engine is the one ``docker version`` reaches (``DOCKER_HOST``
or the default socket), else, as root, a private ``dockerd`` this module starts and stops: its
own data root, exec root and socket in a temporary directory, no bridge, no iptables rules, no
registry (nothing is pulled: the images are loaded). Without the variable, or without an engine,
every test here is skipped, with the reason.

What is checked: a docker-archive (``cowfs image export STACK --to IMG.tar``) loads, Docker's
image lists the diff_ids cowfs wrote, and a container made from it (``docker create``, never
started) exports exactly the stack's view, but for what Docker adds to every container; an OCI
layout (``--format oci``, as a tar) loads where the engine reads OCI layouts (with the containerd
image store), and is skipped, with the engine's answer, where it does not (the classic image
store: Docker 20.10 of Debian 12 says ``open .../blobs/json: no such file or directory``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tools_support import cowfs

OPT_IN = "COWFS_TEST_DOCKER"
DOCKERD = "/usr/sbin/dockerd"
#: What Docker and podman put in every container's filesystem.
ENGINE_ADDS = {".dockerenv", "dev", "proc", "sys", "run", "etc/hostname", "etc/hosts",
               "etc/resolv.conf", "etc/mtab"}

Docker = Callable[..., subprocess.CompletedProcess[bytes]]


def _client() -> str:
    client = shutil.which("docker")
    if client is None:
        pytest.skip("no docker client on PATH (make docker-load-test installs docker.io)")
    return client


def _answers(docker: Docker) -> bool:
    return docker("version", check=False).returncode == 0


@contextlib.contextmanager
def _private_dockerd(client: str) -> Iterator[Docker]:
    """A dockerd of this test's own, gone with its files afterwards. The directory is short:
    containerd's socket path must fit in 108 bytes."""
    top = Path(tempfile.mkdtemp(prefix="cowfs-dockerd-", dir="/tmp"))
    sock = top / "docker.sock"

    def docker(*args: str | Path, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([client, "-H", f"unix://{sock}", *map(str, args)],
                              capture_output=True, timeout=timeout, check=check,
                              stdin=subprocess.DEVNULL)

    with open(top / "dockerd.log", "wb") as log:
        daemon = subprocess.Popen(
            [DOCKERD, "--data-root", str(top / "data"), "--exec-root", str(top / "exec"),
             "--pidfile", str(top / "dockerd.pid"), "-H", f"unix://{sock}", "--bridge=none",
             "--iptables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers(docker):
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail("dockerd did not start: "
                            + (top / "dockerd.log").read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        yield docker
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
        # What the engine left mounted under its directories, deepest first; then its files.
        inside = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4].startswith(f"{top}/")]
        for mountpoint in sorted(inside, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False, timeout=30)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"opt-in: {OPT_IN}=1 (make docker-load-test) loads images into a Docker "
                    "engine")
    client = _client()

    def running(*args: str | Path, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([client, *map(str, args)], capture_output=True, timeout=timeout,
                              check=check, stdin=subprocess.DEVNULL)

    if _answers(running):
        yield running
        return
    if os.geteuid() != 0 or not os.access(DOCKERD, os.X_OK):
        pytest.skip(f"no Docker engine answers, and {DOCKERD} cannot be started here (root and "
                    "docker.io needed)")
    with _private_dockerd(client) as private:
        yield private


def _ok(*args: str | Path) -> str:
    result = cowfs(*args, timeout=120)
    assert result.status == 0, result
    return result.out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and one frozen layer over it: a changed file, a deleted one, a renamed directory,
    hard links, a symlink."""
    root = tmp_path_factory.mktemp("docker")
    base = root / "base"
    for rel, text in (("etc/motd", "hello\n"), ("etc/old", "gone\n"), ("old/inner/z", "z\n")):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    os.symlink("../etc/motd", base / "motd-link")
    path = root / "stack"
    _ok("layer", "init", path, base)
    _ok("run", path, "--", "sh", "-c", "echo changed > etc/motd; rm etc/old; mv old new; "
        "mkdir -p opt/app; echo app > opt/app/run; ln opt/app/run opt/app/run2")
    _ok("layer", "freeze", path)
    return path


def _view(stack: Path, mnt: Path) -> dict[str, str]:
    """The stack's view through a mount: each path, with a file's content, a symlink's target,
    or "dir"."""
    mnt.mkdir(exist_ok=True)
    _ok("mount", stack, mnt)
    try:
        seen: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                rel = str(full.relative_to(mnt))
                seen[rel] = (f"-> {os.readlink(full)}" if full.is_symlink() else
                             "dir" if full.is_dir() else full.read_text())
        return seen
    finally:
        _ok("umount", mnt)


def _container_files(docker: Docker, image: str) -> dict[str, str]:
    """What ``docker export`` of a container made from ``image`` holds, as :func:`_view`."""
    made = docker("create", "--pull", "never", image, "/none")
    container = made.stdout.decode().strip()
    try:
        exported = docker("export", container, timeout=300).stdout
    finally:
        docker("rm", container, check=False)
    seen: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        by_name = {m.name.rstrip("/"): m for m in tar.getmembers()}
        for name, member in by_name.items():
            if member.issym():
                seen[name] = f"-> {member.linkname}"
            elif member.isdir():
                seen[name] = "dir"
            else:
                data = tar.extractfile(member if not member.islnk() else by_name[member.linkname])
                assert data is not None
                seen[name] = data.read().decode()
    return {name: what for name, what in seen.items()
            if not any(name == d or name.startswith(d + "/") for d in ENGINE_ADDS)}


def _tar_of(layout: Path, archive: Path) -> Path:
    """An OCI layout directory as a tar (what ``podman save --format oci-archive`` writes)."""
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(layout.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def _diff_ids_in_docker(docker: Docker, image: str) -> list[str]:
    out = docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", image).stdout
    layers: list[str] = json.loads(out)
    return layers


def _diff_ids_written(image: Path) -> list[str]:
    """The diff_ids the config of what ``cowfs image export`` wrote lists (a docker-archive, or
    an OCI layout directory)."""
    if image.is_dir():
        def blob(digest: str) -> bytes:
            return (image / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()

        index = json.loads((image / "index.json").read_text())
        config = json.loads(blob(index["manifests"][0]["digest"]))["config"]["digest"]
        ids: list[str] = json.loads(blob(config))["rootfs"]["diff_ids"]
        return ids
    with tarfile.open(image) as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            assert member is not None
            return member.read()

        manifest = json.loads(read("manifest.json"))[0]
        ids = json.loads(read(manifest["Config"]))["rootfs"]["diff_ids"]
    return ids


def test_docker_loads_a_docker_archive_and_shows_the_stack(docker: Docker, stack: Path,
                                                           tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    tag = f"cowfs-test-{os.getpid()}:archive"
    _ok("image", "export", stack, "--to", archive, "--tag", tag)
    loaded = docker("load", "-i", archive, check=False, timeout=300)
    assert loaded.returncode == 0, loaded.stderr.decode()
    try:
        assert tag in loaded.stdout.decode()
        assert _diff_ids_in_docker(docker, tag) == _diff_ids_written(archive)
        assert _container_files(docker, tag) == _view(stack, tmp_path / "mnt")
    finally:
        docker("rmi", tag, check=False)


def test_docker_loads_an_oci_layout_where_it_reads_them(docker: Docker, stack: Path,
                                                        tmp_path: Path) -> None:
    layout = tmp_path / "image.oci"
    tag = f"cowfs-test-{os.getpid()}:oci"
    _ok("image", "export", stack, "--to", layout, "--tag", tag)
    archive = _tar_of(layout, tmp_path / "layout.tar")
    loaded = docker("load", "-i", archive, check=False, timeout=300)
    # Only the containerd image store reads an OCI layout without Docker's manifest.json.
    status = docker("info", "--format", "{{json .DriverStatus}}").stdout.decode()
    if loaded.returncode != 0 and "io.containerd.snapshotter" not in status:
        version = docker("version", "--format", "{{.Server.Version}}").stdout.decode().strip()
        pytest.skip(f"Docker {version} with its classic image store loads no OCI layout (the "
                    f"containerd image store does); it said: {loaded.stderr.decode().strip()}")
    assert loaded.returncode == 0, loaded.stderr.decode()
    try:
        images = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode()
        assert tag in images.split()
        assert _container_files(docker, tag) == _view(stack, tmp_path / "mnt")
    finally:
        docker("rmi", tag, check=False)


# --- podman: no engine, so no opt-in; not a required package --------------------------------------


@pytest.fixture
def podman() -> Iterator[Docker]:
    """podman with its storage (vfs) in a scratch directory, reset and removed afterwards (a
    short one: podman refuses a run root longer than 50 characters)."""
    client = shutil.which("podman")
    if client is None:
        pytest.skip("podman is not installed (not a required package: apt-get install podman)")
    if os.geteuid() != 0:
        pytest.skip("podman's rootless storage needs subordinate ids for this user")
    top = Path(tempfile.mkdtemp(prefix="cowfs-podman-", dir="/tmp"))
    options = ["--root", str(top / "root"), "--runroot", str(top / "run"), "--storage-driver",
               "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    def run(*args: str | Path, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([client, *options, *map(str, args)], capture_output=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    try:
        yield run
    finally:
        run("system", "reset", "--force", check=False)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("form", ["docker-archive", "oci-layout", "oci-layout-tar"])
def test_podman_loads_what_image_export_writes(podman: Docker, stack: Path, tmp_path: Path,
                                               form: str) -> None:
    """The docker-archive, the OCI layout directory, and the layout as a tar (oci-archive)."""
    image = tmp_path / ("image.tar" if form == "docker-archive" else "image.oci")
    _ok("image", "export", stack, "--to", image, "--tag", "localhost/cowfs-test:1")
    given = image
    if form == "oci-layout-tar":
        given = _tar_of(image, tmp_path / "layout.tar")
    loaded = podman("load", "-i", given, check=False, timeout=300)
    assert loaded.returncode == 0, loaded.stderr.decode()
    # "Loaded image: NAME" (a layout directory is named after itself, not by its annotation)
    name = loaded.stdout.decode().strip().splitlines()[-1].split(": ", 1)[1]
    if form != "oci-layout":
        assert name == "localhost/cowfs-test:1"
    assert _diff_ids_in_docker(podman, name) == _diff_ids_written(image)
    assert _container_files(podman, name) == _view(stack, tmp_path / "mnt")
