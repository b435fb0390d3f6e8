"""The ``codemae`` command line.

Thin commands over an importable core: each module in ``codemae_cli.commands`` defines a
``register(app, bench)`` function that adds its Typer commands. Command modules import
nothing heavy at module level (torch, rasterio, geopandas are imported inside the command),
so ``codemae --help`` and ``codemae --version`` answer instantly. Imports run one way: this
module registers the command modules; they take their shared wrapper from
``commands/_common.py`` and never import this module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from codemae_cli import __version__

app = typer.Typer(
    name="codemae",
    help="Pair optical and SAR rasters, pretrain CoDe-MAE, fine-tune it, and predict whole scenes "
    "into georeferenced rasters.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(
    help="Benchmarks: throughput, TFLOP/s and fraction of peak, each against a baseline measured in "
    "the same run.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(bench_app, name="bench")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"codemae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """codemae: CoDe-MAE optical/SAR foundation-model toolkit."""


def _register_commands() -> None:
    import codemae_cli.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"codemae_cli.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app, bench_app)


_register_commands()


def main() -> None:
    app(prog_name="codemae")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
