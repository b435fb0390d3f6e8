"""``codemae pretrain`` and ``codemae bench loader``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import THREADS_HELP, cli_command, start_training_run


def _parse_workers(text: str) -> list[int]:
    from codemae_cli.errors import UserError

    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"--workers must be a comma-separated list of integers such as 0,1,2,4, not '{text}'") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"--workers must list non-negative integers, not '{text}'")
    return values


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("pretrain")
    @cli_command
    def pretrain_cmd(
        recipe: str = typer.Argument(
            ..., help="Pretraining recipe: a YAML file, or the name of one installed with codemae (hr, smoke, "
            "baselines/mae; `codemae recipes` lists them)."),
        overrides: Optional[list[str]] = typer.Option(
            None, "--set", "-s", help="Override a recipe value: --set optim.blr=1e-4 (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in the output directory from checkpoints/last."),
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default: run.output_dir)."),
        print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe and exit."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    ) -> None:
        """Pretrain CoDe-MAE on prepared optical/SAR chips.

        The same command runs on a CPU, one GPU, or under torchrun on many GPUs and nodes:
        torchrun --nproc_per_node=8 -m codemae_cli pretrain recipes/hr.yaml
        """
        from codemae_cli.defaults import resolve_recipe
        from codemae_cli.fsutil import cleaned_on_refusal
        from codemae_cli.train.recipe import load_pretrain_recipe

        cfg = load_pretrain_recipe(resolve_recipe(recipe, echo=typer.echo), overrides)
        if output_dir is not None:
            cfg.run.output_dir = str(output_dir)
        if not start_training_run(cfg, lambda: [(cfg.model.okd.teacher_weights, "the teacher weights")],
                                  print_recipe=print_recipe, threads=threads, echo=typer.echo):
            return
        from codemae_cli.train.pretrain import run_pretrain

        with cleaned_on_refusal(cfg.run.output_dir):
            run_pretrain(cfg, resume=resume)

    @bench.command("loader")
    @cli_command
    def bench_loader_cmd(
        dataset: Optional[Path] = typer.Option(
            None, "--dataset", "-d", help="Prepared dataset directory (default: a synthetic one in a temp dir)."),
        workers: str = typer.Option("0,1,2,4", "--workers", help="Worker counts to measure, comma-separated."),
        img_size: int = typer.Option(224, "--img-size", help="Crop size the loader delivers."),
        batch_size: int = typer.Option(64, "--batch-size", help="Pairs per batch."),
        batches: int = typer.Option(30, "--batches", help="Batches timed per worker count (after warm-up)."),
        augment_on: str = typer.Option("loader,device", "--augment-on",
                                       help="Modes to measure: loader (CPU augmentation), device (tiles only)."),
    ) -> None:
        """Pairs/s delivered from memory-mapped shards (crop, flip, normalise, resize), one worker
        and scaling with workers, against a raw memmap read measured in the same run."""
        from codemae_cli.bench.loader_bench import run_loader_bench
        from codemae_cli.errors import UserError

        if img_size < 8 or batch_size < 1 or batches < 1:
            raise UserError("--img-size must be at least 8, --batch-size and --batches at least 1")
        if dataset is not None and not dataset.is_dir():
            raise UserError(f"dataset directory '{dataset}' does not exist")
        modes = tuple(m.strip() for m in augment_on.split(",") if m.strip())
        if not modes or any(m not in ("loader", "device") for m in modes):
            raise UserError(f"--augment-on must list loader and/or device, not '{augment_on}'")
        run_loader_bench(str(dataset) if dataset else None, _parse_workers(workers), img_size=img_size,
                         batch_size=batch_size, batches=batches, modes=modes, echo=typer.echo)
