"""A mount in a container started without ``--device /dev/fuse --cap-add SYS_ADMIN`` says which
flags are missing (issue 13), instead of libfuse's ``fuse_session_mount failed``.

The container is imitated on this machine, for real where it matters: CAP_SYS_ADMIN is dropped
from the capability bounding set with ``setpriv`` (as docker does without ``--cap-add
SYS_ADMIN``; root then cannot gain it, nor can set-user-ID fusermount3), and /dev/fuse is hidden
by a tmpfs on /dev in a private mount namespace (as without ``--device /dev/fuse``). The
environment variable ``container`` (set by podman, systemd-nspawn, LXC) marks it a container on
any host. ``make docker-test`` runs the same cases in a real container (docker/smoke-test.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import find_cowfs

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities and namespaces: root"),
    pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("unshare") is None,
                       reason="needs setpriv and unshare (util-linux)"),
]


def _mount_in(tmp_path: Path, *, drop_sys_admin: bool, hide_device: bool,
              container: bool = True) -> subprocess.CompletedProcess[str]:
    for name in ("base", "upper", "mnt"):
        (tmp_path / name).mkdir(exist_ok=True)
    cowfs = [str(find_cowfs()), "mount", str(tmp_path / "base"), str(tmp_path / "upper"),
             str(tmp_path / "mnt")]
    if drop_sys_admin:
        cowfs = ["setpriv", "--bounding-set", "-sys_admin", "--", *cowfs]
    if hide_device:
        cowfs = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 'mount -t tmpfs none /dev && exec "$@"', "sh", *cowfs]
    env = {**os.environ, "container": "docker"} if container else dict(os.environ)
    return subprocess.run(cowfs, capture_output=True, text=True, timeout=60, env=env,
                          check=False)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cowfs: error: "), result.stderr
    return lines[0]


def test_no_cap_sys_admin_names_the_cap_add_flag(tmp_path: Path) -> None:
    line = _one_error_line(_mount_in(tmp_path, drop_sys_admin=True, hide_device=False))
    assert "no CAP_SYS_ADMIN" in line
    assert "--device /dev/fuse --cap-add SYS_ADMIN (missing: --cap-add SYS_ADMIN)" in line
    assert not os.listdir(tmp_path / "upper")  # refused before anything was set up


def test_no_device_names_the_device_flag(tmp_path: Path) -> None:
    line = _one_error_line(_mount_in(tmp_path, drop_sys_admin=False, hide_device=True))
    assert "/dev/fuse does not exist" in line
    assert "(missing: --device /dev/fuse)" in line


def test_neither_names_both_flags(tmp_path: Path) -> None:
    line = _one_error_line(_mount_in(tmp_path, drop_sys_admin=True, hide_device=True))
    assert "/dev/fuse does not exist and no CAP_SYS_ADMIN" in line
    assert "(missing: --device /dev/fuse --cap-add SYS_ADMIN)" in line


@pytest.mark.skipif(os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"),
                    reason="this machine is a container: the plain-host wording cannot show")
def test_outside_a_container_the_capability_is_named_without_docker_flags(
        tmp_path: Path) -> None:
    line = _one_error_line(_mount_in(tmp_path, drop_sys_admin=True, hide_device=False,
                                     container=False))
    assert "cannot gain CAP_SYS_ADMIN" in line
    assert "--cap-add" not in line
