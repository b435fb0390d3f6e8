"""``codemae evaluate``: metrics of a fine-tuned checkpoint on a prepared split, or of a predicted
class raster against a reference raster / vector file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import THREADS_HELP, cli_command
from codemae_cli.errors import UserError


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("evaluate")
    @cli_command
    def evaluate_cmd(
        checkpoint: Optional[Path] = typer.Option(
            None, "--checkpoint", "-c", help="Fine-tuned checkpoint or run directory (uses checkpoints/best)."
        ),
        data: Optional[list[Path]] = typer.Option(
            None, "--data", "-d", help="Prepared dataset directory with labels (repeatable)."
        ),
        split: str = typer.Option("test", "--split", help="Split of the prepared data to evaluate."),
        inputs: Optional[str] = typer.Option(
            None, "--inputs", help="optical | sar: evaluate a bi-modal model with the other modality missing."
        ),
        pred: Optional[Path] = typer.Option(None, "--pred", help="Predicted class raster (e.g. from codemae predict)."),
        ref: Optional[Path] = typer.Option(
            None, "--ref", help="Reference labels: a raster (warped onto the prediction grid, nearest) or a vector file."
        ),
        label_column: Optional[str] = typer.Option(
            None, "--label-column", help="Vector attribute holding class ids or names, read as prepare reads labels (default: class; a file without it holds footprints = class 1)."
        ),
        classes: Optional[str] = typer.Option(
            None, "--classes", help="Comma-separated class names in id order (default: from the raster tags)."
        ),
        ignore_index: int = typer.Option(255, "--ignore-index", help="Reference value that is not scored."),
        ref_nodata: Optional[float] = typer.Option(
            None, "--ref-nodata", help="Reference raster value marking unlabelled pixels, e.g. -1 (default: the "
            "file's nodata); not scored."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
        batch_size: int = typer.Option(8, "--batch-size", help="Chips per forward pass (checkpoint mode)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (checkpoint mode)."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    ) -> None:
        """Score a fine-tuned checkpoint on a prepared split, or a predicted raster against a reference.

        Either --checkpoint with --data (a prepared split), or --pred with --ref (a raster warped
        onto the prediction's grid with nearest, or a vector file reprojected and rasterised).
        Prints per-class IoU, F1, precision, recall, mIoU, OA and kappa; --json writes them too.
        """
        if (checkpoint is None) == (pred is None):
            raise UserError("give either --checkpoint (with --data) or --pred (with --ref)")
        from rich.console import Console

        from codemae_cli.tasks.evaluate import evaluate_checkpoint, evaluate_raster, metrics_table, write_json

        if json_out is not None:
            _guard_json(json_out, checkpoint, data, pred, ref)
        if checkpoint is not None:
            from codemae_cli.threads import apply_threads

            apply_threads(threads)
            if not data:
                raise UserError("--checkpoint needs --data: one or more prepared dataset directories with labels")
            if ref is not None:
                raise UserError("--ref belongs with --pred; a checkpoint is evaluated on --data")
            metrics = evaluate_checkpoint(checkpoint, [str(d) for d in data], split=split, batch_size=batch_size,
                                          device=device, inputs=inputs)
            title = f"{metrics['checkpoint']} on {split} ({metrics['inputs']})"
        else:
            if ref is None:
                raise UserError("--pred needs --ref: a reference raster or vector file")
            if data:
                raise UserError("--data belongs with --checkpoint; a prediction is compared with --ref")
            names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
            metrics = evaluate_raster(pred, ref, label_column=label_column, classes=names, ignore_index=ignore_index,
                                      ref_nodata=ref_nodata)
            title = f"{pred.name} vs {ref.name}"
        console = Console()
        console.print(metrics_table(metrics, title=title))
        if json_out is not None:
            console.print(f"metrics written to {write_json(metrics, json_out)}")


def _guard_json(json_out: Path, checkpoint, data, pred, ref) -> None:
    """--json may not be, contain or lie inside an input; it replaces only a metrics file."""
    from codemae_cli.fsutil import check_replaceable, guard_outputs, is_metrics_json, sweep_stale
    from codemae_cli.train.checkpoint import resolve_checkpoint

    inputs = [(pred, "the predicted raster"), (ref, "the reference")]
    inputs += [(d, "the prepared dataset") for d in data or []]
    if checkpoint is not None:
        inputs += [(resolve_checkpoint(checkpoint), "the checkpoint")]
    guard_outputs([(json_out, "--json")], inputs, create_parents=False)  # like predict: no mkdir of a typo
    check_replaceable(json_out, "--json", is_metrics_json, maker="codemae evaluate")
    sweep_stale(json_out)
