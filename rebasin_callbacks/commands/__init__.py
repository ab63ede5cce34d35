"""Subcommands of the ``rebasin`` command that work on checkpoints: ``align``, ``lmc`` and ``spec``.

Each module has ``add_arguments(parser)`` and ``run(args) -> int`` (see :mod:`rebasin_callbacks.cli`). They
never import Lightning; a user error (missing file, wrong architecture) prints one line and returns an exit
status (:data:`~rebasin_callbacks.commands.common.EXIT_USAGE`, :data:`~rebasin_callbacks.commands.common.EXIT_MISMATCH`)
instead of a traceback.
"""
