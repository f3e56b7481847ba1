"""The ``lf-*`` entry points (each ``@lf_command``), quiet by default (:mod:`trainer.cli.quiet`).

Importing a module of this package has no side effect and imports no torch-ecosystem framework:
registration (resolvers, plugins, log filters) happens in a command's ``main``, and the heavy imports
in the function that runs its job, so ``--help`` and config errors answer at once.
"""
