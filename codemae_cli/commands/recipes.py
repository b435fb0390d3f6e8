"""``codemae recipes``: list the recipes installed with codemae, or copy them out to edit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import cli_command


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("recipes")
    @cli_command
    def recipes_cmd(
        names: Optional[list[str]] = typer.Argument(None, help="Recipes to copy out, e.g. hr seg baselines/mae."),
        copy_all: bool = typer.Option(False, "--all", help="Copy every installed recipe."),
        output: Path = typer.Option(Path("recipes"), "--output", "-o", help="Folder the copies go to."),
    ) -> None:
        """List the recipes installed with codemae; with names (or --all), copy them into recipes/.

        Any command that takes a recipe also takes its name (codemae pretrain hr), and a path
        such as recipes/hr.yaml that does not exist falls back to the installed recipe.
        """
        from codemae_cli.defaults import copy_recipes, list_recipes, packaged_recipes_dir, recipe_summary

        if not names and not copy_all:
            root = packaged_recipes_dir()
            width = max((len(n) for n in list_recipes()), default=0)
            for name in list_recipes():
                typer.echo(f"{name:<{width}}  {recipe_summary(root / f'{name}.yaml')}")
            typer.echo(f"\n{root}\nCopy one out to edit it: codemae recipes hr seg  (writes {output}/hr.yaml ...)")
            return
        from codemae_cli.fsutil import guard_outputs

        guard_outputs([(output, "--output")], [(packaged_recipes_dir(), "the installed recipes")], folder=True)
        for path in copy_recipes(list(names or []), output):
            typer.echo(f"wrote {path}")
