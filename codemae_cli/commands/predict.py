"""``codemae predict`` (whole scene -> georeferenced COG) and ``codemae bench predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import THREADS_HELP, cli_command


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def print_summary(summary: dict) -> None:
    """The end-of-run summary: where the output is, what it holds, how fast it was made."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    total = summary["width"] * summary["height"]
    for note in summary.get("notes") or []:
        console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"[bold]Wrote[/bold] {summary['path']} ({_fmt_bytes(summary['bytes'])}, Cloud-Optimised GeoTIFF)")
    console.print(
        f"  {summary['width']} x {summary['height']} px, CRS {summary['crs']}, nodata {summary['nodata']}, "
        f"inputs {summary['inputs']}, window {summary['window']} px / overlap {summary['overlap']} px, "
        f"{summary['windows']} windows on {summary['device']}" + (", TTA flips" if summary.get("tta") else "")
    )
    table = Table(title="pixels per class", show_edge=False)
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("share", justify="right")
    for name, n in summary["pixels_per_class"].items():
        table.add_row(name, f"{n:,}", f"{100.0 * n / max(total, 1):.2f} %")
    table.add_row("[dim]nodata[/dim]", f"{summary['nodata_pixels']:,}", f"{100.0 * summary['nodata_pixels'] / max(total, 1):.2f} %")
    console.print(table)
    if summary.get("probabilities"):
        console.print(f"  probabilities: {summary['probabilities']}")
    vec = summary.get("vectors")
    if vec:
        console.print(f"  polygons: {vec['path']} ({vec['polygons']} polygons)")
    console.print(f"  {summary['seconds']:.1f} s, {summary['mpx_per_s']:.2f} Mpx/s")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    _register_predict(app)
    _register_bench_predict(bench)


def _latest_checkpoint() -> Path:
    """The run directory of the latest fine-tuned run under runs/, said aloud."""
    import time

    from codemae_cli.defaults import latest_finetuned_run

    found = latest_finetuned_run()
    typer.echo(f"using the latest fine-tuned run {found.run_dir} ({found.checkpoint.name}, written "
               f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(found.when))}); -c chooses another")
    return found.run_dir


def _text(path: Optional[Path]) -> Optional[str]:
    """A path option as the string the inference layer takes (None when not given)."""
    return str(path) if path else None


def _register_predict(group: typer.Typer) -> None:
    @group.command("predict")
    @cli_command
    def predict_cmd(
        scene: Optional[Path] = typer.Argument(
            None, help="Scene to predict: the optical scene (the SAR scene for SAR-only checkpoints)."
        ),
        output: Path = typer.Option(..., "--output", "-o", help="Output class map (Cloud-Optimised GeoTIFF)."),
        checkpoint: Optional[Path] = typer.Option(
            None, "--checkpoint", "-c", help="Fine-tuned checkpoint directory or run directory (uses checkpoints/best; "
            "default: the latest fine-tuned run under runs/)."
        ),
        sar: Optional[Path] = typer.Option(None, "--sar", help="SAR scene, warped onto the optical grid on the fly."),
        inputs: Optional[str] = typer.Option(
            None, "--inputs", help="optical | sar | both (default: what the checkpoint was fine-tuned on)."
        ),
        window: Optional[int] = typer.Option(None, "--window", help="Window size in pixels (default: the chip size the checkpoint was fine-tuned on)."),
        overlap: float = typer.Option(0.25, "--overlap", help="Window overlap: a fraction of the window (<1) or pixels."),
        batch_size: int = typer.Option(8, "--batch-size", "-b", help="Windows per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU) | bf16 | fp32."),
        tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average over horizontal/vertical flips."),
        probabilities: Optional[Path] = typer.Option(None, "--probabilities", help="Also write class probabilities (COG)."),
        probabilities_dtype: str = typer.Option("uint8", "--probabilities-dtype", help="uint8 (p x 254, 255 = nodata) | float32."),
        vectorize: Optional[Path] = typer.Option(None, "--vectorize", help="Also write polygons per class (GeoPackage)."),
        min_area: float = typer.Option(0.0, "--min-area", help="Drop polygons smaller than this many m^2 (in any CRS, degrees included)."),
        simplify: float = typer.Option(0.0, "--simplify", help="Polygon simplification tolerance (CRS units)."),
        sar_scale: str = typer.Option(
            "auto", "--sar-scale", help="Units of the SAR scene: auto (those of the training data, as the checkpoint "
            "records them; dB for older checkpoints) | db | linear (power) | amplitude."),
        readers: int = typer.Option(2, "--readers", help="Threads reading the scene ahead of the model."),
        nodata_optical: Optional[str] = typer.Option(
            None, "--nodata-optical", help="Optical nodata value, or none (default: the one given to prepare, "
            "else the file's; NaN is always nodata)."),
        nodata_sar: Optional[str] = typer.Option(
            None, "--nodata-sar", help="SAR nodata value, or none (default: the one given to prepare, else the "
            "file's; NaN is always nodata)."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Predict a whole scene with a fine-tuned model into a georeferenced Cloud-Optimised GeoTIFF."""
        from codemae_cli.infer.run import predict_from_checkpoint
        from codemae_cli.threads import apply_threads

        apply_threads(threads, echo=None if quiet else typer.echo)
        if checkpoint is None:
            checkpoint = _latest_checkpoint()
        summary = predict_from_checkpoint(
            checkpoint, _text(scene), out=output, sar=_text(sar), inputs=inputs, window=window, overlap=overlap,
            batch_size=batch_size, device=device, tta=tta, probabilities=_text(probabilities),
            probabilities_dtype=probabilities_dtype, vectorize=_text(vectorize), min_area=min_area,
            simplify=simplify, sar_scale=sar_scale, precision=precision, progress=not quiet, readers=readers,
            nodata_optical=nodata_optical, nodata_sar=nodata_sar,
        )
        print_summary(summary)


def _parse_sizes(size: str) -> list[int]:
    """`--size 2000,8000` as integers; one sentence when it is not."""
    from codemae_cli.errors import UserError

    try:
        return [int(s) for s in size.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--size must be comma-separated integers, not '{size}'") from None


def _register_bench_predict(group: typer.Typer) -> None:
    @group.command("predict")
    @cli_command
    def bench_predict_cmd(
        size: str = typer.Option("2000,8000", "--size", help="Scene sizes (square, pixels), comma-separated."),
        preset: str = typer.Option("tiny", "--preset", help="Model preset of the randomly initialised model."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
        window: int = typer.Option(512, "--window", help="Window size in pixels."),
        overlap: float = typer.Option(0.25, "--overlap", help="Overlap: a fraction of the window or pixels "
                                      "(predict's default)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the scenes are generated (default: a temp dir)."),
        head: str = typer.Option("linear", "--head", help="Segmentation head: linear | upernet | fpn."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
        repeat: int = typer.Option(1, "--repeat", help="Interleaved repetitions of the three contenders (medians)."),
    ) -> None:
        """End-to-end predict Mpx/s against a model-only loop and a hand-written loop, and peak RSS per scene size."""
        from codemae_cli.bench.predict_bench import print_results, run_predict_bench

        results = run_predict_bench(_parse_sizes(size), preset=preset, device=device, window=window, overlap=overlap,
                                    batch_size=batch_size, workdir=workdir, compile=compile, head=head,
                                    repeat=repeat)
        print_results(results)
