"""Representation analyses and the OKD / CCL / CDR ablation testbed.

    metrics.py   effective rank, modality gap, paired/unpaired similarity, patch SSIM (numpy)
    analyze.py   run_analyze(checkpoints, dataset_dir, out_dir, ...)  -> `codemae analyze`
    testbed.py   render_testbed_scene / write_testbed: optical/SAR scenes with documented physics
    probe.py     linear probing on cached frozen features
    ablation.py  run_ablation(out_dir, scale=..., seeds=..., variants=...)  -> `codemae ablate`

Nothing heavy is imported here; see docs/analysis.md.
"""
