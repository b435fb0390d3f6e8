"""The built-in sample as a dataset a recipe can name: ``data.datasets: [sample:spacenet6_rotterdam]``.

The first run that names it prepares the sample (the same ``codemae prepare`` options as
``codemae demo``) into the cache folder (``$CODEMAE_CACHE``, else ``$XDG_CACHE_HOME/codemae``,
else ``~/.cache/codemae``); later runs read the prepared copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from codemae_cli.errors import UserError

PREFIX = "sample:"
SAMPLES = {
    "spacenet6_rotterdam": dict(
        optical="rgb_unmasked.tif", sar="sar_masked.tif", labels="water_labels.gpkg", label_column="class",
        classes="land,water", sar_scale="db", tile=64, stride=32, block=2, seed=1,
    ),
}


def sample_dir(name: str = "spacenet6_rotterdam") -> Path:
    return Path(__file__).resolve().parents[1] / "sample_data" / name


def cache_dir() -> Path:
    if os.environ.get("CODEMAE_CACHE"):
        return Path(os.environ["CODEMAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "codemae"


def resolve_dataset(entry: str, echo=None) -> str:
    """A dataset directory for a ``data.datasets`` entry (``sample:NAME`` prepared on first use)."""
    if not str(entry).startswith(PREFIX):
        return str(entry)
    name = str(entry)[len(PREFIX):]
    if name not in SAMPLES:
        raise UserError(f"unknown sample dataset '{entry}'; the built-in one is {PREFIX}{', '.join(SAMPLES)}")
    out = cache_dir() / "samples" / name
    if (out / "metadata.json").is_file():
        return str(out)
    from codemae_cli.data.prepare import PrepareOptions, run_prepare

    spec = dict(SAMPLES[name])
    src = sample_dir(name)
    if echo is not None:
        echo(f"preparing the built-in sample '{name}' once into {out}")
    try:
        run_prepare(PrepareOptions(out=str(out), optical=[str(src / spec.pop("optical"))],
                                   sar=[str(src / spec.pop("sar"))], labels=str(src / spec.pop("labels")), **spec))
    except UserError:
        if not (out / "metadata.json").is_file():  # not another process that prepared it meanwhile
            raise
    return str(out)


def resolve_datasets(entries: list[str], echo=None) -> list[str]:
    return [resolve_dataset(e, echo) for e in entries]


__all__ = ["cache_dir", "resolve_dataset", "resolve_datasets", "sample_dir"]
