"""`wsi-pipe list encoders|methods`: what the registries hold, read from the registries.

The other commands' help does not spell out these choices (that would be a second list to keep
in step, and it would import torch for every `--help`); it points here instead.
"""

from __future__ import annotations

from enum import Enum

import typer

from wsi_pipe.cli.common import console, run_guarded


class _What(str, Enum):
    encoders = "encoders"
    methods = "methods"


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_(
        what: _What = typer.Argument(..., help="encoders (tile encoders) | methods (MIL)"),
        tiny: bool = typer.Option(False, "--tiny", help="also the tiny test variants"),
    ) -> None:
        """List registered tile encoders or MIL methods, with their options."""

        def body() -> None:
            from rich.table import Table

            if what is _What.encoders:
                from wsi_pipe.encoders import encoder_family, get_encoder_spec, list_encoders

                t = Table("encoder", "family", "input px", "µm/px", "embed dim", "mean / std")
                for name in list_encoders(tiny=None if tiny else False):
                    s = get_encoder_spec(name)
                    t.add_row(
                        name,
                        encoder_family(name),
                        str(s.input_px),
                        f"{s.mpp:g}",
                        str(s.embed_dim),
                        f"{tuple(round(v, 3) for v in s.mean)} / {tuple(round(v, 3) for v in s.std)}",
                    )
                console.print(t)
                console.print(
                    "also: timm:<arch> with --weights FILE (any timm architecture, local weights)"
                )
            else:
                from wsi_pipe.mil.registry import AGGREGATORS

                t = Table("method", "options", "description")
                for e in AGGREGATORS.entries():
                    if e.tiny_variant and not tiny:
                        continue
                    t.add_row(e.name, ", ".join(sorted(e.options)), e.description)
                console.print(t)

        run_guarded(body)
