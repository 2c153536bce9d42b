"""The ``pteenet`` command line: a thin typer app over the :mod:`pteenet` library."""
