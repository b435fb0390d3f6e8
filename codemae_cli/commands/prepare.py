"""``codemae prepare`` (optical/SAR scenes -> chip shards + index) and ``codemae bench prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import cli_command


def print_summary(summary: dict) -> None:
    """End-of-run summary: chips kept and dropped, alignment applied, output paths."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="codemae prepare", show_header=False, show_edge=False)
    table.add_column("", style="bold")
    table.add_column("")
    sp = summary["splits"]
    table.add_row("chips kept", f"{summary['chips']:,} of {summary['candidates']:,} "
                  f"(train {sp['train']:,}, val {sp['val']:,}, test {sp['test']:,})")
    empty = [k for k in ("train", "val", "test") if sp[k] == 0]
    if empty:
        table.add_row("note", f"no {' / '.join(empty)} chips: fewer split blocks than splits; "
                      "use a smaller --block or more data" + (" (stats are empty)" if "train" in empty else ""))
    dropped = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in summary["dropped"].items()) or "none"
    table.add_row("chips dropped", dropped)
    table.add_row("scenes", f"{summary['scenes']}")
    area = summary["overlap_area"]
    table.add_row("overlap area", f"{area / 1e6:,.3f} km2" if area >= 1e4 else f"{area:,.1f} m2")
    if summary.get("bands"):
        table.add_row("bands", summary["bands"])
    table.add_row("reference grid", f"{summary['crs']}, {summary['res'][0]:.4g} x {summary['res'][1]:.4g}")
    first = True
    shown = summary["warped"][:3]
    for scene in shown:
        # One line per distinct treatment: "a.tif, b.tif: EPSG:32635 20 -> EPSG:3035 10, bilinear".
        groups: dict[str, list[str]] = {}
        for note in scene["notes"]:
            name, _, how = note.partition(": ")
            groups.setdefault(how, []).append(name)
        for how, names in groups.items():
            listed = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
            table.add_row("alignment" if first else "", escape(f"[{scene['scene_id']}] {listed}: {how}"))
            first = False
    if len(summary["warped"]) > len(shown):
        table.add_row("", f"... and {len(summary['warped']) - len(shown)} more scenes (see metadata.json)")
    if summary.get("labels"):
        classes = ", ".join(f"{k}={v}" for k, v in summary["labels"]["classes"].items())
        table.add_row("classes", classes)
        if summary["labels"].get("nodata") is not None:
            table.add_row("unlabelled", f"label value {summary['labels']['nodata']:g} -> ignore index "
                          f"{summary['labels']['ignore_index']}")
    else:
        table.add_row("labels", "none (chips for pretraining; give --labels to fine-tune on them)")
    paths = summary["paths"]
    table.add_row("dataset", summary["out"])
    table.add_row("index", paths["index"])
    table.add_row("shards", f"{paths['shards']} ({summary['shards']} per modality)")
    if paths.get("quicklook"):
        table.add_row("quick-look", paths["quicklook"])
    table.add_row("time", f"{summary['seconds']:.1f} s ({summary['chips'] / max(summary['seconds'], 1e-9):.1f} chips/s)")
    console.print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    _register_prepare(app)
    _register_bench_prepare(bench)


def _register_prepare(group: typer.Typer) -> None:
    @group.command("prepare")
    @cli_command
    def prepare_cmd(
        optical: Optional[list[str]] = typer.Option(
            None, "--optical", help="Optical raster(s): a file, a folder or a glob; repeat for band files (stacked in order)."
        ),
        sar: Optional[list[str]] = typer.Option(
            None, "--sar", help="SAR raster(s): a file, a folder or a glob; repeat for polarisation files."
        ),
        manifest: Optional[Path] = typer.Option(
            None, "--manifest", help="CSV or YAML with one scene pair per row (columns optical, sar, labels, scene_id)."
        ),
        output: Path = typer.Option(
            Path("data"), "--output", "-o",
            help="Output dataset directory (default: data/, the folder every recipe's data.datasets reads)."),
        tile: int = typer.Option(256, "--tile", help="Chip size in pixels of the reference grid."),
        stride: Optional[int] = typer.Option(None, "--stride", help="Step between chips (default: --tile)."),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="Overlap between chips in pixels (stride = tile - overlap)."),
        ref: str = typer.Option("optical", "--ref", help="Reference grid: optical | sar (its finest raster)."),
        crs: Optional[str] = typer.Option(None, "--crs", help="Re-project the reference grid to this CRS (e.g. EPSG:32631)."),
        res: Optional[float] = typer.Option(None, "--res", help="Pixel size of the reference grid, in CRS units."),
        sar_scale: str = typer.Option(
            "auto", "--sar-scale",
            help="SAR input units: linear (power) | amplitude | db | auto (complex: |z|^2; integers: amplitude; "
            "negative floats: dB; else linear). Stored as dB.",
        ),
        nodata_optical: Optional[str] = typer.Option(None, "--nodata-optical", help="Optical nodata value (default: from the file; 'none' for no value)."),
        nodata_sar: Optional[str] = typer.Option(None, "--nodata-sar", help="SAR nodata value (default: from the file; NaN is always nodata)."),
        optical_bands: Optional[str] = typer.Option(
            None, "--optical-bands",
            help="Keep these optical bands, counted from 1 in the stacked input, e.g. 2,3,4 (Sentinel-2 B2-B4 of a "
            "13-band file). Recorded; predict selects the same bands from a full scene."),
        sar_bands: Optional[str] = typer.Option(None, "--sar-bands", help="Keep these SAR bands (from 1), e.g. 1 for VV only."),
        optical_range: Optional[float] = typer.Option(
            None, "--optical-range",
            help="Optical value that maps to 1 at the source scale the OKD teacher sees (default by dtype: "
            "uint8 255, other integers their maximum, floats 1; e.g. 2047 for 11-bit data in uint16).",
        ),
        min_valid: float = typer.Option(0.5, "--min-valid", help="Keep a chip only if at least this fraction is valid in BOTH modalities."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Labels: a vector file (with --label-column) or a label raster."),
        label_column: Optional[str] = typer.Option(None, "--label-column", help="Class column of a vector label file (default: class; a file without it holds footprints = class 1)."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Class names by code, e.g. background,building."),
        label_nodata: Optional[str] = typer.Option(
            None, "--label-nodata",
            help="Label raster value marking unlabelled pixels, e.g. -1 (default: the file's nodata); they get the "
            "ignore index 255 and are never trained on or scored."),
        split: str = typer.Option("0.8,0.1,0.1", "--split", help="train,val,test fractions."),
        block: int = typer.Option(4, "--block", help="Spatial split block size, in chips (neighbouring chips share a split)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split."),
        workers: int = typer.Option(1, "--workers", "-j", help="Worker processes (over scenes / bands of rows)."),
        shard_size: int = typer.Option(1024, "--shard-size", help="Chips per shard file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dataset."),
        resume: bool = typer.Option(
            False, "--resume",
            help="Work in OUT.partial, kept if the run stops; rerunning the same command skips finished work.",
        ),
        no_quicklook: bool = typer.Option(False, "--no-quicklook", help="Do not write quicklook.png."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    ) -> None:
        """Pair optical and SAR rasters into co-registered, memory-mappable chips with a georeferenced index."""
        from codemae_cli.data.prepare import PrepareOptions, run_prepare

        summary = run_prepare(PrepareOptions(
            out=str(output), optical=list(optical or []), sar=list(sar or []),
            manifest=str(manifest) if manifest else None, labels=str(labels) if labels else None,
            label_column=label_column, classes=classes, tile=tile, stride=stride, overlap=overlap, ref=ref,
            crs=crs, res=res, sar_scale=sar_scale, nodata_optical=nodata_optical, nodata_sar=nodata_sar,
            optical_bands=optical_bands, optical_range=optical_range, sar_bands=sar_bands, label_nodata=label_nodata,
            min_valid=min_valid, split=split, block=block, seed=seed, workers=workers, overwrite=overwrite,
            shard_size=shard_size, quicklook=not no_quicklook, progress=not quiet, resume=resume,
        ))
        if not quiet:
            print_summary(summary)


def _register_bench_prepare(group: typer.Typer) -> None:
    @group.command("prepare")
    @cli_command
    def bench_prepare_cmd(
        size: int = typer.Option(4096, "--size", help="Scene height and width in pixels (e.g. 4096, 8192)."),
        tile: int = typer.Option(256, "--tile", help="Chip size."),
        workers: int = typer.Option(1, "--workers", "-j", help="Prepare worker processes."),
        sar_crs: str = typer.Option("EPSG:32632", "--sar-crs", help="CRS of the generated SAR scene."),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to generate (default: a temp dir, removed after)."),
    ) -> None:
        """Time prepare against a plain rasterio read + warp + write of the same generated pair."""
        from codemae_cli.bench.prepare_bench import run_prepare_bench

        run_prepare_bench(size=size, tile=tile, workers=workers, sar_crs=sar_crs, workdir=workdir)
