"""``codemae analyze`` (representation analyses of checkpoints) and ``codemae ablate`` (the
OKD / CCL / CDR ablation on the generated testbed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from codemae_cli.commands._common import cli_command

    @app.command("analyze")
    @cli_command
    def analyze(
        checkpoints: list[Path] = typer.Argument(..., help="Pretraining checkpoints or run directories to compare."),
        data: Path = typer.Option(..., "--data", "-d", help="Prepared (paired) dataset directory."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (JSON + PNG plots)."),
        split: str = typer.Option("val", help="Split whose chips are analysed."),
        max_chips: int = typer.Option(64, "--max-chips", help="Chips analysed (evenly spread over the split)."),
        layer: Optional[int] = typer.Option(None, help="Encoder block whose tokens are analysed (default: last)."),
        reconstructions: int = typer.Option(4, help="Chips shown in the cross-reconstruction figures (0: none)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Representation analyses of pretraining checkpoints on the same chips.

        Effective rank, modality gap, paired/unpaired similarity, token similarity against patch
        SSIM, and cross-modal reconstructions; writes analysis.json and PNG plots.
        """
        from codemae_cli.analysis.analyze import run_analyze

        doc = run_analyze(checkpoints, data, out, split=split, max_chips=max_chips, layer=layer,
                          reconstructions=reconstructions, device=device, overwrite=overwrite)
        typer.echo(f"{len(doc['chips'])} '{split}' chips, {len(doc['checkpoints'])} checkpoint(s) -> {out}")
        for name, r in doc["checkpoints"].items():
            er, gap, sim = r["effective_rank"], r["modality_gap"]["chips"], r["similarity"]["chips"]
            rho = r["similarity_vs_ssim"]["spearman"]
            typer.echo(
                f"  {name}: erank optical {er['optical_tokens']:.1f} SAR {er['sar_tokens']:.1f} | gap {gap:.3f} | "
                f"cos paired {sim['paired']:.3f} unpaired {sim['unpaired']:.3f} | "
                f"rho(cos, SSIM) {_fmt(rho)}"
            )
        typer.echo(f"  wrote {out / 'analysis.json'}, spectra.png, similarity_vs_ssim.png")

    @app.command("ablate")
    @cli_command
    def ablate(
        out: Path = typer.Option(..., "--out", "-o", help="Ablation directory (resumable)."),
        scale: str = typer.Option("tiny", help="tiny (CPU, minutes per variant) | small | gpu"),
        seeds: int = typer.Option(3, help="Seeds per variant (0..seeds-1)."),
        variants: Optional[list[str]] = typer.Option(
            None, "--variants", "-v",
            help="Variants to run (repeat the option): mae okd ccl cdr codemae rigid full_xrec (the default); "
            "on request the reference forms cdr_spatial cdr_dual cdr_hog cdr_sar_gradient cdr_median, codemae's "
            "cdr_spatial_mean cdr_dual_mean cdr_hog_cells, and rigid_ref codemae_ref (reference switches).",
        ),
        pretrain_steps: Optional[int] = typer.Option(None, help="Override the scale's pretraining steps."),
        probe_steps: Optional[int] = typer.Option(None, help="Override the scale's probing steps."),
    ) -> None:
        """Ablate OKD, CCL and CDR on the generated testbed and write one table.

        Pretrains each variant with the same budget and seeds, probes it on SAR-only,
        optical-only and bi-modal segmentation, analyses it, and writes OUT/table.md and
        OUT/table.json. Re-running the same command skips finished cells.
        """
        from codemae_cli.analysis.ablation import run_ablation

        names = []
        for v in variants or []:
            names += [s for s in v.replace(",", " ").split() if s]
        overrides = {}
        if pretrain_steps is not None:
            overrides["pretrain_steps"] = pretrain_steps
        if probe_steps is not None:
            overrides["probe_steps"] = probe_steps
        run_ablation(out, scale=scale, seeds=seeds, variants=names or None, overrides=overrides,
                     log=typer.echo)
        typer.echo((out / "table.md").read_text())
        typer.echo(f"wrote {out / 'table.md'} and {out / 'table.json'}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
