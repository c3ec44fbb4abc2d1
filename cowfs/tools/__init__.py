"""The command line of the offline tools (diff, commit, reset, export, import, status, check) and
``cowfs run``: :mod:`cowfs.tools.commands` wires one sub-parser and one handler per command.

The tools sit on top of the library: the layer walk (:mod:`cowfs.walk`), its records as text
(:mod:`cowfs.changes`), the workspace operations (:mod:`cowfs.workspace`), the running mounts
(:mod:`cowfs.mounts`) and the Python API (:mod:`cowfs.api`, for ``run``). Nothing below imports
this package. None of the tools needs FUSE except ``run``, which mounts.
"""
