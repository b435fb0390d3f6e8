"""``codemae bench model`` (CoDe-MAE training-step throughput vs a plain MAE) and
``codemae model info`` (presets, parameters, FLOPs)."""

from __future__ import annotations

from typing import Optional

import typer

from codemae_cli.commands._common import cli_command

model_app = typer.Typer(help="The CoDe-MAE model: presets, parameter counts, FLOPs.", no_args_is_help=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(model_app, name="model")

    @model_app.command("info")
    @cli_command
    def info_cmd(
        optical_bands: int = typer.Option(3, "--optical-bands", help="Optical bands of the input."),
        sar_bands: int = typer.Option(2, "--sar-bands", help="SAR polarisations of the input."),
        img_size: int = typer.Option(224, "--img-size", help="Training crop size in pixels."),
        patch_size: int = typer.Option(16, "--patch-size", help="Patch size in pixels."),
    ) -> None:
        """Presets with their sizes, parameters (encoder; trainable CoDe-MAE, EMA teacher) and
        analytic training-step GFLOP per pair (plain MAE: per image)."""
        from rich.console import Console
        from rich.table import Table

        from codemae_cli.model.summary import preset_table

        rows = preset_table(optical_bands, sar_bands, img_size, patch_size)
        table = Table(title=f"CoDe-MAE presets ({optical_bands} optical + {sar_bands} SAR bands, "
                            f"{img_size} px, patch {patch_size}, EMA teacher)")
        for col in ("preset", "width", "depth", "heads", "decoder", "encoder", "CoDe-MAE",
                    "GFLOP/pair", "MAE GFLOP/img"):
            table.add_column(col, justify="right" if col != "preset" else "left")
        for r in rows:
            table.add_row(r["preset"], str(r["embed_dim"]), str(r["depth"]), str(r["heads"]), r["decoder"],
                          f"{r['encoder_params'] / 1e6:.1f} M", f"{r['model_params'] / 1e6:.1f} M",
                          f"{r['gflop_per_pair']:.1f}", f"{r['mae_gflop_per_image']:.1f}")
        Console().print(table)

    @bench.command("model")
    @cli_command
    def bench_model_cmd(
        preset: str = typer.Option("base", "--preset", help="tiny | small | base | large."),
        batch: int = typer.Option(128, "--batch", "-b", help="Pairs per step (images per step for the plain MAE)."),
        steps: int = typer.Option(10, "--steps", help="Timed steps per measurement."),
        warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (compilation happens here)."),
        compile: bool = typer.Option(False, "--compile", help="Also measure torch.compile'd models."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."),
        img_size: int = typer.Option(224, "--img-size", help="Crop size in pixels."),
        patch_size: int = typer.Option(16, "--patch-size", help="Patch size in pixels."),
        optical_bands: int = typer.Option(3, "--optical-bands", help="Optical bands."),
        sar_bands: int = typer.Option(2, "--sar-bands", help="SAR polarisations."),
        teacher: str = typer.Option("timm", "--teacher", help="OKD teacher: timm (random weights) | ema | off."),
        teacher_model: str = typer.Option(
            "vit_large_patch16_dinov3", "--teacher-model", help="timm teacher architecture (random weights)."
        ),
        plain_attn: bool = typer.Option(False, "--plain-attn", help="Hand-written attention instead of SDPA."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (CPU runs)."),
    ) -> None:
        """Training-step time, pairs/s, TFLOP/s and fraction of peak of CoDe-MAE, with a plain MAE
        of the same size measured in the same run."""
        import torch

        from codemae_cli.bench.model_bench import format_report, run_model_bench
        from codemae_cli.errors import UserError
        from codemae_cli.model.config import PRESETS

        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        report = run_model_bench(
            preset=preset, batch=batch, steps=steps, warmup=warmup, device=device, compile=compile,
            img_size=img_size, patch_size=patch_size, optical_bands=optical_bands, sar_bands=sar_bands,
            teacher=teacher, teacher_model=teacher_model, precision=precision, fused_attn=not plain_attn,
            log=typer.echo,
        )
        typer.echo("")
        typer.echo(format_report(report))
