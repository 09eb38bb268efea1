"""Thin Typer command line: each command loads its config, applies overrides, calls a stage."""
