"""The command line of the offline tools (diff, commit, reset, export, import, status, check) and
``cowfs run``: :mod:`cowfs.tools.commands` wires one sub-parser and one handler per command.

The tools sit on top of the library: the layer walk (:mod:`cowfs.tools.walk`), its records as text
(:mod:`cowfs.tools.changes`), the workspace operations (:mod:`cowfs.tools.workspace`), the running
mounts (:mod:`cowfs.core.mounts`) and the Python API (:mod:`cowfs.tools.api`, for ``run``). Nothing
below imports this package. None of the tools needs FUSE except ``run``, which mounts.
"""
