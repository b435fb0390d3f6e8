"""``codemae synth``: write a synthetic georeferenced optical/SAR scene pair with labels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import cli_command


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("synth")
    @cli_command
    def synth_cmd(
        output: Path = typer.Option(..., "--output", "-o", help="Output folder (created)."),
        size: int = typer.Option(1024, "--size", help="Optical scene height and width in pixels."),
        height: Optional[int] = typer.Option(None, "--height", help="Height, if different from --size."),
        width: Optional[int] = typer.Option(None, "--width", help="Width, if different from --size."),
        seed: int = typer.Option(0, "--seed", help="Scene seed."),
        optical_bands: int = typer.Option(4, "--optical-bands", help="Optical bands (4: blue, green, red, NIR)."),
        optical_dtype: str = typer.Option("uint16", "--optical-dtype", help="uint16 | uint8 | float32."),
        sar_bands: int = typer.Option(2, "--sar-bands", help="SAR polarisations (2: VV, VH)."),
        sar_scale: str = typer.Option("linear", "--sar-scale", help="SAR units written: linear | db | amplitude."),
        sar_crs: Optional[str] = typer.Option(None, "--sar-crs", help="CRS of the SAR raster (default: the optical CRS)."),
        sar_res: Optional[float] = typer.Option(None, "--sar-res", help="SAR pixel size in its CRS units."),
        res: float = typer.Option(1.0, "--res", help="Optical pixel size (metres)."),
        nodata_optical: Optional[float] = typer.Option(0, "--nodata-optical", help="Optical nodata value written to the file."),
        no_labels: bool = typer.Option(False, "--no-labels", help="Do not write the label raster."),
        name: str = typer.Option("scene", "--name", help="File name prefix."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Write into a non-empty folder, replacing only scenes synth wrote there."),
    ) -> None:
        """Generate a synthetic optical/SAR pair with land-cover labels (water, vegetation, bare, built-up)."""
        from codemae_cli.data.synth import write_scene_pair

        out = write_scene_pair(
            output, height or size, width or size, seed=seed, optical_bands=optical_bands,
            optical_dtype=optical_dtype, sar_bands=sar_bands, sar_scale=sar_scale, sar_crs=sar_crs,
            sar_res=sar_res, nodata_optical=nodata_optical, labels=not no_labels, res=res, name=name,
            overwrite=overwrite,
        )
        typer.echo(f"optical: {out['optical']}")
        typer.echo(f"sar:     {out['sar']}")
        if out["labels"]:
            typer.echo(f"labels:  {out['labels']} (classes: {', '.join(out['classes'])})")
