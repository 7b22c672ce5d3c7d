"""Subcommands of the perfusion console script, one module each."""
