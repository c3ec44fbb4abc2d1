"""A plain user's failed mount says why, in one line, in the background and with -f (issue 9, §3).

Run as root, each test runs ``cowfs mount`` as uid 65534 ('nobody') on layers of its own, inside a
mount namespace of its own (``unshare -m``, a slave of the machine's: other tests' unmounts reach
it, nothing done in it leaves it) that gives the plain user what the test needs without
changing anything outside it (other tests, also a plain user's, run at the same time): a
``/dev/fuse`` of the mode the test wants (these machines ship it 0600), and a searchable path to
the interpreter (the virtualenv's Python may live under /root, mode 0700): a directory the plain
user cannot search is covered by a tmpfs of mode 0755 holding only the needed child, bound back
in. Where that is impossible the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import find_cowfs

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv to act as a plain user in a private mount namespace")


def _blocked_steps() -> list[tuple[Path, str]]:
    """(directory the plain user cannot search, the child of it on the way) for every path the
    cowfs command needs: the interpreter, the script, the virtualenv and PYTHONPATH."""
    needed = [Path(os.path.realpath(sys.executable)), find_cowfs(), Path(sys.prefix),
              *(Path(p) for p in os.environ.get("PYTHONPATH", "").split(":") if p)]
    steps: dict[Path, str] = {}
    for target in needed:
        target = target.resolve()
        for parent in reversed(target.parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                child = target.relative_to(parent).parts[0]
                if steps.setdefault(parent, child) != child:
                    pytest.skip(f"{parent} would have to show two children to the plain user")
    return sorted(steps.items())


@dataclass
class PlainUser:
    base: Path  # a directory of the plain user's, with lower/, upper/ and mnt/

    def shell(self, command: str, *, device_mode: int) -> subprocess.CompletedProcess[str]:
        """Run a shell ``command`` as the plain user, in a private mount namespace whose
        /dev/fuse has ``device_mode``."""
        stage = self.base.parent / (self.base.name + ".ns")
        rdev = os.stat("/dev/fuse").st_rdev
        setup = [f"mount -t tmpfs -o mode=0755 cowfs-test {stage}",
                 f"mkdir {stage}/dev {stage}/keep",
                 f"mknod -m {device_mode:o} {stage}/dev/fuse c {os.major(rdev)} {os.minor(rdev)}",
                 f"mount --bind {stage}/dev/fuse /dev/fuse"]
        for i, (directory, child) in enumerate(_blocked_steps()):
            keep = f"{stage}/keep/{i}"
            inner = shlex.quote(str(directory / child))
            setup += [f"mkdir {keep}", f"mount --bind {inner} {keep}",
                      f"mount -t tmpfs -o mode=0755 cowfs-test {shlex.quote(str(directory))}",
                      f"mkdir {inner}", f"mount --bind {keep} {inner}"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base),
               "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "LC_ALL": "C",
               "COWFS": str(find_cowfs()), "PYTHON": sys.executable}
        user = (f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "
                f"sh -c {shlex.quote(command)}")
        stage.mkdir()
        try:
            return subprocess.run(["unshare", "--mount", "--propagation", "slave", "sh", "-ec",
                                   "\n".join([*setup, user])], env=env, cwd=self.base,
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            stage.rmdir()

    def mount(self, *options: str, mnt: str = "mnt",
              device_mode: int = 0o666) -> subprocess.CompletedProcess[str]:
        args = " ".join(shlex.quote(a) for a in options)
        return self.shell(f'"$COWFS" mount {args} lower upper {mnt}', device_mode=device_mode)


@pytest.fixture
def plain_user() -> Iterator[PlainUser]:
    """Layers owned by 'nobody', in a directory of its own that it can reach."""
    base = Path(tempfile.mkdtemp(prefix="cowfs-plain-"))
    try:
        base.chmod(0o755)
        for name in ("lower", "upper", "mnt"):
            (base / name).mkdir()
        (base / "lower" / "file").write_text("lower")
        for path in (*base.iterdir(), base / "lower" / "file"):
            os.chown(path, NOBODY, NOBODY)
        user = PlainUser(base)
        probe = user.shell('"$COWFS" --version', device_mode=0o600)
        if probe.returncode != 0:
            pytest.skip(f"the plain user cannot run cowfs here: {probe.stderr.strip()}")
        yield user
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cowfs: error: "), result.stderr
    for text in expected:
        assert text in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_no_access_to_dev_fuse(plain_user: PlainUser, foreground: bool) -> None:
    result = plain_user.mount(*(["-f"] if foreground else []), device_mode=0o600)
    _one_line_error(result, "cannot open /dev/fuse: permission denied", "0666",
                    "setfacl -m u:nobody:rw /dev/fuse")


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_allow_other_needs_user_allow_other(plain_user: PlainUser, foreground: bool) -> None:
    conf = Path("/etc/fuse.conf")
    if conf.exists() and any(line.split("#")[0].strip() == "user_allow_other"
                             for line in conf.read_text().splitlines()):
        pytest.skip("/etc/fuse.conf allows allow_other for plain users here")
    result = plain_user.mount(*(["-f"] if foreground else []), "-o", "allow_other")
    _one_line_error(result, "allow_other", "user_allow_other", "/etc/fuse.conf")


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_a_mountpoint_the_user_may_not_write(plain_user: PlainUser, foreground: bool) -> None:
    (plain_user.base / "mnt2").mkdir(mode=0o755)  # root's
    result = plain_user.mount(*(["-f"] if foreground else []), mnt="mnt2")
    _one_line_error(result, "mnt2", "use a directory you own")


def test_what_libfuse_refuses_is_said_in_its_own_words(plain_user: PlainUser) -> None:
    """Past the up-front checks (called directly here), a refusal by libfuse or fusermount3 is
    translated with the message they printed, which a background daemon would not show."""
    theirs = plain_user.base / "mnt2"
    theirs.mkdir(mode=0o755)
    script = ("import pyfuse3, sys\n"
              "from cowfs.daemon import fusecheck\n"
              "from cowfs.core.errors import CowfsError\n"
              "try:\n"
              f"    fusecheck.init(pyfuse3.Operations(), {str(theirs)!r}, {{'fsname=t'}})\n"
              "except CowfsError as e:\n"
              "    print(e)\n"
              "    sys.exit(1)\n")
    result = plain_user.shell(f'"$PYTHON" -c {shlex.quote(script)}', device_mode=0o666)
    assert result.returncode == 1, result
    assert "fusermount3: user has no write access to mountpoint" in result.stdout, result
    assert "use a directory you own" in result.stdout
    assert "Traceback" not in result.stderr


def test_the_same_user_can_mount_once_allowed(plain_user: PlainUser) -> None:
    """The control: with /dev/fuse usable, the same command mounts, serves and unmounts."""
    result = plain_user.shell(
        '"$COWFS" mount lower upper mnt; cat mnt/file; echo;'
        ' awk -v m="$PWD/mnt" \'$5 == m\' /proc/self/mountinfo | grep -c fuse.cowfs;'
        ' "$COWFS" umount mnt || fusermount3 -u -z mnt', device_mode=0o666)
    assert result.returncode == 0, result
    assert result.stdout.split() == ["lower", "1"], result


def test_suid_and_dev_for_a_plain_user_are_said_to_be_dropped(plain_user: PlainUser) -> None:
    """A plain user's FUSE mount is always nosuid,nodev (fusermount3 drops the options, and
    said so only to a background daemon's stderr): cowfs says it, mounts without them, and
    'cowfs status' shows what applies (issue 21)."""
    result = plain_user.shell(
        '"$COWFS" mount -o suid,dev lower upper mnt; cat mnt/file; echo;'
        ' awk -v m="$PWD/mnt" \'$5 == m {print $6}\' /proc/self/mountinfo;'
        ' "$COWFS" umount mnt || fusermount3 -u -z mnt', device_mode=0o666)
    assert result.returncode == 0, result
    words = result.stdout.split()
    assert words[0] == "lower", result
    assert {"nosuid", "nodev"} <= set(words[1].split(",")), result
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1, result.stderr
    assert "suid,dev" in warning[0], warning
    assert "needs root" in warning[0], warning
    assert "Traceback" not in result.stderr
