"""The ``lf-*`` entry points (each ``@lf_command``), quiet by default (:mod:`trainer.cli.quiet`)."""

from trainer.cli.quiet import quiet_known_noise

quiet_known_noise()
