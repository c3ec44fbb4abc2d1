#!/usr/bin/env bash
# Mount a small demo overlay in a fresh directory under /tmp and show, command by command, what
# cowfs does: the merged view, copy-up on write, and a whiteout on delete. The overlay is left
# mounted to explore; if any step fails, it is unmounted before exiting non-zero.
# Run through `make demo`, which sets up .venv first.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cowfs="$repo/.venv/bin/cowfs"
if [[ ! -x $cowfs ]]; then
    echo "$cowfs not found: run 'make demo' (or 'make setup' first)." >&2
    exit 1
fi

# So that the commands shown read as a user would type them.
PATH="$repo/.venv/bin:$PATH"

demo=$(realpath "$(mktemp -d /tmp/cowfs-demo.XXXXXX)")
cd "$demo"

is_mounted() {
    awk -v mnt="$demo/mnt" '$2 == mnt { found = 1 } END { exit !found }' /proc/mounts
}

on_exit() {
    local status=$?
    if ((status != 0)) && is_mounted; then
        echo "demo failed (exit $status); unmounting $demo/mnt" >&2
        "$cowfs" umount "$demo/mnt" || fusermount3 -u "$demo/mnt" || umount -l "$demo/mnt" || true
    fi
    if ((status != 0)); then
        echo "demo failed; its directories are left in $demo" >&2
    fi
    exit "$status"
}
trap on_exit EXIT

# Print a command as typed, then run it (eval, so redirections read as they are shown).
show() {
    printf '\n$ %s\n' "$1"
    eval "$1"
}

# Print a comment, one line per argument.
say() {
    printf '\n'
    printf '# %s\n' "$@"
}

# Each file's content names its layer, so a read shows which layer served it.
mkdir base upper mnt base/docs
echo 'base:hello' >base/hello.txt
echo 'base:todo' >base/todo.txt
echo 'base:docs/readme' >base/docs/readme.txt
echo 'base:docs/draft' >base/docs/draft.txt

say "In $demo: base/ is the lower layer (read-only to cowfs), upper/ takes the changes."
show 'find base -type f | sort'
show 'cowfs mount base upper mnt'

say 'The merged view: everything in base, nothing copied yet.'
show 'ls -la mnt mnt/docs'
show 'cat mnt/hello.txt'

say 'Write through the mount: the file is copied up to upper/ first; base/ is untouched.'
show "echo 'appended through the mount' >>mnt/hello.txt"
show 'cat mnt/hello.txt'
show 'cat base/hello.txt'
show 'ls -la upper'
show 'cat upper/hello.txt'

say 'Delete through the mount: upper/ gets a whiteout (a 0/0 character device, as the' \
    "kernel's overlayfs makes it); base/ still has the file."
show 'rm mnt/docs/draft.txt'
show 'ls -la mnt/docs base/docs'
show 'ls -laR upper'
show "stat -c '%n: %F %t:%T' upper/docs/draft.txt"

say 'What the upper changes, as git status or docker diff shows it (M modified, D deleted):'
show 'cowfs diff mnt'

say 'Throw one change away (the upper must not be mounted): the file is the base one again.'
show 'cowfs umount mnt'
show 'cowfs reset --yes upper hello.txt'
show 'cowfs diff upper'
show 'cowfs mount base upper mnt'
show 'cat mnt/hello.txt'

say 'A disposable view: run a command over base/ in a view only it sees; its changes are' \
    'listed, then thrown away (--upper DIR keeps them).'
show "cowfs run base -- sh -c 'echo scratch >new.txt; rm todo.txt'"
show 'ls base'

cat <<EOF

The overlay is still mounted, to explore:
  merged view:  $demo/mnt
  lower layer:  $demo/base
  upper layer:  $demo/upper   (work dir: $demo/upper/.cowfs-work)

When done:
  $cowfs umount $demo/mnt
  rm -r $demo
EOF
