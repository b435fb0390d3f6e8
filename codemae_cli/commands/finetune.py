"""``codemae finetune``: segmentation / classification / linear probing from a pretrained encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import THREADS_HELP, cli_command, start_training_run


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("finetune")
    @cli_command
    def finetune_cmd(
        recipe: str = typer.Argument(
            ..., help="Fine-tuning recipe: a YAML file, or the name of one installed with codemae (seg, cls, "
            "linprobe; `codemae recipes` lists them)."),
        overrides: Optional[list[str]] = typer.Option(
            None, "--set", "-s", help="Override a recipe value: --set task.inputs=sar (repeatable)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in run.output_dir from checkpoints/last."),
        print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe and exit."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    ) -> None:
        """Fine-tune a pretrained CoDe-MAE encoder (or train from scratch) on labelled prepared chips.

        Segmentation (UPerNet / FPN / linear) or (multi-label) classification, on optical, SAR or
        both inputs; per-class IoU, mIoU, F1 and OA on the validation split every epoch; the best
        checkpoint by task.best_metric. Runs the same on CPU, one GPU or under torchrun.
        """
        from rich.console import Console

        from codemae_cli.config import load_recipe
        from codemae_cli.defaults import resolve_recipe
        from codemae_cli.fsutil import cleaned_on_refusal
        from codemae_cli.tasks.config import FinetuneRecipe

        console = Console()
        cfg = load_recipe(resolve_recipe(recipe, echo=console.print), FinetuneRecipe, overrides)
        if not start_training_run(cfg, lambda: [(pretrained_checkpoint(cfg), "the pretrained checkpoint")],
                                  print_recipe=print_recipe, threads=threads, echo=console.print):
            return
        from codemae_cli.tasks.evaluate import metrics_table
        from codemae_cli.tasks.finetune import run_finetune

        with cleaned_on_refusal(cfg.run.output_dir):
            result = run_finetune(cfg, resume=resume, console=console)
        if result.get("best_metrics"):
            console.print(metrics_table(result["best_metrics"], title=f"best validation (epoch {result['best_epoch']})"))
        console.print(f"checkpoints: {Path(result['run_dir']) / 'checkpoints'}")


def pretrained_checkpoint(cfg):
    """The checkpoint folder fine-tuning reads (None from scratch or when it is not set)."""
    if cfg.task.from_scratch or not cfg.task.pretrained:
        return None
    from codemae_cli.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(cfg.task.pretrained)
