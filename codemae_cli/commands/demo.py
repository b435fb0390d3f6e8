"""``codemae demo``: the whole journey on the built-in real sample, as a new user would type it.

prepare -> pretrain (smoke) -> finetune -> predict -> evaluate on the SpaceNet 6 Rotterdam
optical/SAR pair shipped in ``codemae_cli/sample_data``. Each step is the real command, run in
its own process and printed first, so the demo doubles as a copy-paste tutorial.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from codemae_cli.commands._common import cli_command
from codemae_cli.errors import UserError
from codemae_cli.fsutil import guard_outputs

MARKER = ".codemae-demo"


def demo_steps(out: Path, device: str) -> list[tuple[str, list[str]]]:
    """The commands of the demo, in order (also printed in the README)."""
    from codemae_cli.data.samples import sample_dir
    from codemae_cli.defaults import packaged_recipes_dir

    s, r = sample_dir(), packaged_recipes_dir()
    optical, sar, labels = s / "rgb_unmasked.tif", s / "sar_masked.tif", s / "water_labels.gpkg"
    data, pre, fin = out / "data", out / "pretrain", out / "finetune"
    dev = [] if device == "cpu" else ["--set", f"run.device={device}", "--set", "run.precision=auto"]
    return [
        ("prepare", [
            "prepare", "--optical", str(optical), "--sar", str(sar), "--sar-scale", "db",
            "--labels", str(labels), "--label-column", "class", "--classes", "land,water",
            "--tile", "64", "--stride", "32", "--block", "2", "--seed", "1", "-o", str(data),
        ]),
        ("pretrain", [
            "pretrain", str(r / "smoke.yaml"), "--set", f"data.datasets=[{data}]",
            "--output-dir", str(pre), *dev,
        ]),
        ("finetune", [
            "finetune", str(r / "demo_finetune.yaml"), "--set", f"data.datasets=[{data}]",
            "--set", f"task.pretrained={pre}", "--set", f"run.output_dir={fin}", *dev,
        ]),
        ("predict", [
            "predict", str(optical), "--sar", str(sar), "--sar-scale", "db", "--checkpoint", str(fin),
            "-o", str(out / "water.tif"), "--vectorize", str(out / "water.gpkg"),
            "--probabilities", str(out / "water_prob.tif"), "--device", device,
        ]),
        ("evaluate", [
            "evaluate", "--pred", str(out / "water.tif"), "--ref", str(labels), "--label-column", "class",
            "--classes", "land,water", "--json", str(out / "water_metrics.json"),
        ]),
    ]


def run_demo(out: Path, overwrite: bool = False, device: str = "cpu") -> dict:
    from rich.console import Console
    from rich.table import Table

    from codemae_cli.data.samples import sample_dir
    from codemae_cli.defaults import packaged_recipes_dir
    from codemae_cli.device import resolve_device

    console = Console()
    resolve_device(device)  # an unknown or absent device is refused before anything is written
    out = out.resolve()
    guard_outputs([(out, "the demo folder")],
                  [(sample_dir(), "the built-in sample"), (packaged_recipes_dir(), "the installed recipes")], folder=True)
    if out.exists():
        if not overwrite:
            raise UserError(f"'{out}' already exists; pass --overwrite to replace it")
        if not (out / MARKER).exists():
            raise UserError(f"'{out}' exists and was not made by codemae demo; choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by codemae demo\n")
    timings = {}
    for name, argv in demo_steps(out, device):
        console.rule(f"[bold]{name}")
        console.print("$ codemae " + " ".join(shlex.quote(a) for a in argv), style="cyan", highlight=False, markup=False,
                      soft_wrap=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "codemae_cli", *argv])
        timings[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise UserError(f"the demo's {name} step failed with exit code {proc.returncode} (see its output above)")
    table = Table(title="codemae demo: outputs", show_edge=False)
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    outputs = {
        "prepare": f"{out / 'data'} (index.gpkg, shards/, quicklook.png)",
        "pretrain": f"{out / 'pretrain'} (checkpoints/last, metrics.jsonl, loss curves PNG)",
        "finetune": f"{out / 'finetune'} (checkpoints/best, metrics.jsonl)",
        "predict": f"{out / 'water.tif'} (COG), {out / 'water_prob.tif'}, {out / 'water.gpkg'}",
        "evaluate": f"{out / 'water_metrics.json'}",
    }
    for name, secs in timings.items():
        table.add_row(name, f"{secs:.0f}", outputs[name])
    console.print(table)
    console.print(f"Total {sum(timings.values()):.0f} s. Open {out / 'water.tif'} in QGIS next to the sample's "
                  f"rgb_unmasked.tif.")
    return {"out": str(out), "seconds": timings}


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("demo")
    @cli_command
    def demo_cmd(
        output: Path = typer.Option(Path("demo"), "--output", "-o", help="Where the demo writes everything."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous demo output."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto."),
    ) -> None:
        """Run prepare -> pretrain -> finetune -> predict -> evaluate on the built-in SpaceNet 6 sample."""
        run_demo(output, overwrite=overwrite, device=device)
