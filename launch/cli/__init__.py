"""The ``lpreg`` command line: one module per command, assembled in ``launch.cli.main``."""
