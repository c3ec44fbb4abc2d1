"""The offline tools (diff, commit, reset, export, import, status, check) and ``cowfs run``.

Each is a consumer of the one layer walk in :mod:`cowfs.walk`; the command-line wiring is in
:mod:`cowfs.tools.commands`. None of them needs FUSE except ``run``, which mounts.
"""
