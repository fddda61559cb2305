"""Command glue: what each `musiclm` command does between its arguments and the library.

Layer: commands.
"""
