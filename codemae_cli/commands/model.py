"""``codemae bench model`` (CoDe-MAE training-step throughput vs a plain MAE) and
``codemae model info`` (presets, parameters, FLOPs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from codemae_cli.commands._common import cli_command

model_app = typer.Typer(help="The CoDe-MAE model: presets, parameter counts, FLOPs.", no_args_is_help=True)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    info_cmd = _register_info(model_app)
    _register_default(model_app, info_cmd)
    _register_import_weights(model_app)
    _register_convert(model_app)
    _register_bench_model(bench)


def _print_preset_table(rows: list[dict], optical_bands: int, sar_bands: int, img_size: int, patch_size: int,
                        backbone: str) -> None:
    """The `model info` table: one row per preset (sizes, parameters, GFLOP)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CoDe-MAE {backbone} presets ({optical_bands} optical + {sar_bands} SAR bands, "
                        f"{img_size} px, patch {patch_size}, EMA teacher)")
    cols = ["preset", "width", "depth", "heads", "decoder", "encoder"]
    cols += ["+ neck"] if backbone == "itpn" else []
    cols += ["CoDe-MAE", "GFLOP/pair"] + (["MAE GFLOP/img"] if backbone == "vit" else [])
    for col in cols:
        table.add_column(col, justify="right" if col != "preset" else "left")
    for r in rows:
        cells = [r["preset"], str(r["embed_dim"]), str(r["depth"]), str(r["heads"]), r["decoder"],
                 f"{r['encoder_params'] / 1e6:.1f} M"]
        if backbone == "itpn":
            cells.append(f"{(r['encoder_params'] + r['neck_params']) / 1e6:.1f} M")
        cells += [f"{r['model_params'] / 1e6:.1f} M", f"{r['gflop_per_pair']:.1f}"]
        if backbone == "vit":
            cells.append(f"{r['mae_gflop_per_image']:.1f}")
        table.add_row(*cells)
    Console().print(table)


def _register_info(group: typer.Typer) -> Callable[..., None]:
    @group.command("info")
    @cli_command
    def info_cmd(
        optical_bands: int = typer.Option(3, "--optical-bands", help="Optical bands of the input."),
        sar_bands: int = typer.Option(2, "--sar-bands", help="SAR polarisations of the input."),
        img_size: int = typer.Option(224, "--img-size", help="Training crop size in pixels."),
        patch_size: int = typer.Option(16, "--patch-size", help="Patch size in pixels."),
        backbone: str = typer.Option("vit", "--backbone", help="vit | itpn (the paper's iTPN)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Only this preset (default: all)."),
    ) -> None:
        """Presets with their sizes, parameters (encoder; iTPN pyramid neck; trainable CoDe-MAE,
        EMA teacher) and analytic training-step GFLOP per pair (plain MAE: per image)."""
        from codemae_cli.model.config import preset_spec
        from codemae_cli.model.summary import preset_table

        if preset is not None:
            preset_spec(preset, backbone)  # one sentence for an unknown backbone or preset
        rows = preset_table(optical_bands, sar_bands, img_size, patch_size, backbone=backbone, preset=preset)
        _print_preset_table(rows, optical_bands, sar_bands, img_size, patch_size, backbone)

    return info_cmd


def _register_default(group: typer.Typer, info_cmd: Callable[..., None]) -> None:
    @group.callback(invoke_without_command=True)
    def model_main(
        ctx: typer.Context,
        backbone: Optional[str] = typer.Option(None, "--backbone", help="vit | itpn: the table of `model info`."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Only this preset."),
    ) -> None:
        """The CoDe-MAE model: presets, parameter counts, FLOPs, pretrained weights.
        `codemae model --backbone itpn --preset base` is `codemae model info` for that preset."""
        if ctx.invoked_subcommand is None:
            info_cmd(optical_bands=3, sar_bands=2, img_size=224, patch_size=16, backbone=backbone or "vit",
                     preset=preset)


def _band_names(text: Optional[str]) -> Optional[list[str]]:
    """Comma-separated band names as a list (None when not given)."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _echo_import_result(res, output: Path) -> None:
    """What `model import-weights` wrote, what it left out, and the next command."""
    typer.echo(f"imported iTPN '{res.preset}' CoDe-MAE ({res.tensors} tensors; {res.optical_bands} optical + "
               f"{res.sar_bands} SAR bands, {res.img_size} px, patch {res.patch_size}) -> {res.checkpoint}")
    if res.dropped:
        typer.echo(f"not imported: {len(res.dropped)} distillation-head tensors (teacher width unknown to timm)")
    typer.echo(f"fine-tune with: codemae finetune RECIPE --set task.pretrained={output}")


def _register_import_weights(group: typer.Typer) -> None:
    @group.command("import-weights")
    @cli_command
    def import_cmd(
        weights: Path = typer.Argument(..., help="The published CoDe-MAE iTPN weights (.safetensors or .pth)."),
        output: Path = typer.Option(..., "--output", "-o",
                                    help="Run directory to create; the checkpoint goes to OUTPUT/checkpoints/last."),
        optical_names: Optional[str] = typer.Option(None, "--optical-bands", help="Comma-separated optical band names."),
        sar_names: Optional[str] = typer.Option(None, "--sar-bands", help="Comma-separated SAR band names."),
    ) -> None:
        """Turn the published CoDe-MAE checkpoint (reference `itpn_base_dec512d8b` state dict) into a
        codemae pretraining checkpoint for `codemae finetune`, `codemae analyze` and linear probing."""
        from codemae_cli.errors import UserError
        from codemae_cli.fsutil import check_safetensors, guard_run_dir
        from codemae_cli.tasks.import_weights import import_reference_checkpoint

        target = output / "checkpoints" / "last"
        guard_run_dir(output, [(weights, "the weights file")])
        if target.exists():
            raise UserError(f"'{target}' already exists; choose another --output")
        if weights.suffix.lower() == ".safetensors":
            check_safetensors(weights)
        res = import_reference_checkpoint(weights, target, _band_names(optical_names), _band_names(sar_names))
        _echo_import_result(res, output)


def _register_convert(group: typer.Typer) -> None:
    @group.command("convert")
    @cli_command
    def convert_cmd(
        weights: Path = typer.Argument(..., help="A .pth / .pt / .bin weights file."),
        output: Path = typer.Option(..., "--output", "-o", help="The .safetensors file to write."),
    ) -> None:
        """Convert a torch weights file once to safetensors (read with torch's weights-only loader)."""
        from codemae_cli.errors import UserError
        from codemae_cli.model.weights import convert_to_safetensors

        if output.suffix != ".safetensors":
            raise UserError("--output must end in .safetensors")
        from codemae_cli.fsutil import guard_outputs, sweep_stale

        guard_outputs([(output, "--output")], [(weights, "the weights file")])
        sweep_stale(output)
        if output.exists():
            raise UserError(f"'{output}' already exists; choose another --output")
        n = convert_to_safetensors(weights, output)
        typer.echo(f"wrote {n} tensors to {output}")


def _register_bench_model(group: typer.Typer) -> None:
    @group.command("model")
    @cli_command
    def bench_model_cmd(
        preset: str = typer.Option("base", "--preset", help="tiny | small | base | large (iTPN: tiny | base | large)."),
        backbone: str = typer.Option("vit", "--backbone", help="vit | itpn (the paper's iTPN)."),
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
        from codemae_cli.bench.model_bench import format_report, run_model_bench
        from codemae_cli.model.config import preset_spec
        from codemae_cli.threads import apply_threads

        preset_spec(preset, backbone)  # one sentence for an unknown backbone or preset
        apply_threads(threads, echo=typer.echo)
        report = run_model_bench(
            preset=preset, batch=batch, steps=steps, warmup=warmup, device=device, compile=compile,
            img_size=img_size, patch_size=patch_size, optical_bands=optical_bands, sar_bands=sar_bands,
            teacher=teacher, teacher_model=teacher_model, precision=precision, fused_attn=not plain_attn,
            log=typer.echo, backbone=backbone,
        )
        typer.echo("")
        typer.echo(format_report(report))
