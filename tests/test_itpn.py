"""Contracts of the iTPN backbone: training with every component, masking before the trunk,
the reference's masked position table, pyramid features, initialisation from files and the
import of the reference CoDe-MAE checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakes import random_pair, tiny_model_config
from itpn_reference import TINY as REF_TINY
from itpn_reference import reference_decoder_tokens, reference_levels, reference_state

from codemae_cli.config import from_dict
from codemae_cli.errors import UserError
from codemae_cli.model import ModelConfig, build_encoder, build_model

torch.set_num_threads(1)


def itpn_cfg(**over) -> ModelConfig:
    return tiny_model_config(backbone="itpn", **over)


@pytest.mark.parametrize("okd", [{"teacher": "ema"},
                                 {"teacher": "timm", "teacher_model": "vit_small_patch16_dinov3", "sar_side": True}])
def test_tiny_itpn_trains_with_every_component_and_every_param_gets_a_grad(okd):
    torch.manual_seed(0)
    model = build_model(itpn_cfg(okd=okd), 4, 2)
    out = model(*random_pair())
    assert set(out["losses"]) == {"self_optical", "self_sar", "cdr", "okd", "ccl"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    # the frozen position table is a stored buffer, not a parameter
    assert "encoder.absolute_pos_embed" in model.state_dict()
    assert not any("absolute_pos_embed" in n for n, _ in model.named_parameters())
    # the CCL cross-attention norms use torch's eps, every other LayerNorm 1e-6
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {e for n, e in eps.items() if n.startswith("ccl.")} == {1e-5}
    assert {e for n, e in eps.items() if not n.startswith("ccl.")} == {1e-6}


def test_switched_off_parts_create_no_parameters():
    plain = build_model(itpn_cfg(okd={"enabled": False}, ccl={"mode": "off"}, cdr={"enabled": False}), 3, 1)
    assert {n.split(".")[0] for n, _ in plain.named_parameters()} == {"encoder", "decoder_embed", "self_decoder",
                                                                    "self_heads"}
    rigid = build_model(itpn_cfg(ccl={"mode": "rigid"}, okd={"aux_head": False}), 3, 1)
    names = [n for n, _ in rigid.named_parameters()]
    assert not any(n.startswith(("ccl", "okd_aux")) for n in names)
    out = rigid(*random_pair(co=3, cs=1))
    out["loss"].backward()
    assert all(p.grad is not None for p in rigid.parameters() if p.requires_grad)


def test_masked_patches_never_reach_the_trunk():
    torch.manual_seed(0)
    model = build_model(itpn_cfg(), 4, 2).eval()
    enc = model.encoder
    seen = []
    hook = enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    opt, sar = random_pair(B=2)
    N, n = 16, 4
    ids_keep = torch.stack([torch.randperm(N)[:n] for _ in range(2)])
    levels, _ = enc.forward_masked([("optical", opt), ("sar", sar)], ids_keep)
    hook.remove()
    assert seen == [torch.Size([4, n, 4, 4, 16])]  # 2B images, n visible patches, 4x4 inner tokens
    # whatever the hidden patches hold, the visible tokens come out the same
    hidden = torch.ones(2, N, dtype=torch.bool)
    hidden[torch.arange(2)[:, None], ids_keep] = False
    pix = hidden.reshape(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8).reshape(2, 1, 32, 32)
    opt2, sar2 = opt + 100 * pix * torch.randn_like(opt), sar + 100 * pix * torch.randn_like(sar)
    levels2, _ = enc.forward_masked([("optical", opt2), ("sar", sar2)], ids_keep)
    for a, b in zip(levels, levels2, strict=True):
        torch.testing.assert_close(a, b)


def test_masked_forward_uses_the_reference_resampled_table():
    """With masking, the table is resampled by (h + 0.1) / h (as the reference does); without,
    it is used as is: keeping every patch through the masked path equals an unmasked forward
    whose table was replaced by the resampled one, and differs from the plain unmasked one."""
    from codemae_cli.model.itpn import reference_pos_embed

    torch.manual_seed(0)
    enc = build_encoder(itpn_cfg(), 4, 2).eval()
    opt = random_pair(B=2)[0]
    all_ids = torch.arange(16).repeat(2, 1)
    masked = enc.forward_masked([("optical", opt)], all_ids)[0][0]
    plain = enc.forward_pyramid(optical=opt)["optical"][2]  # stride-16 level as a map
    resampled = reference_pos_embed(enc.absolute_pos_embed, enc.grid, enc.grid)
    assert not torch.allclose(resampled, enc.absolute_pos_embed)
    enc.absolute_pos_embed.copy_(resampled)
    shifted = enc.forward_pyramid(optical=opt)["optical"][2]
    as_map = masked.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(as_map, shifted)
    assert not torch.allclose(as_map, plain)


def test_the_resampled_table_follows_every_change_of_the_table():
    """The masked forward's resampled table is computed once per grid, yet always equals the
    resampling of the table as it is now: changed in place, loaded, cast, or learnable."""
    from codemae_cli.model.itpn import reference_pos_embed

    torch.manual_seed(0)
    enc = build_encoder(itpn_cfg(), 4, 2)
    grid = enc.grid

    def expected():
        return reference_pos_embed(enc.absolute_pos_embed, enc.grid, grid)

    with torch.inference_mode():  # asked first under inference mode (analysis), then trained
        torch.testing.assert_close(enc.pos_embed(grid, masked=True), expected(), rtol=0, atol=0)
    opt = random_pair(B=2)[0]
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    enc.forward_masked([("optical", opt)], ids)[0][0].sum().backward()
    with torch.no_grad():
        enc.absolute_pos_embed.mul_(2.0)  # in place: same storage, new values
    torch.testing.assert_close(enc.pos_embed(grid, masked=True), expected(), rtol=0, atol=0)
    other = build_encoder(itpn_cfg(), 4, 2)
    with torch.no_grad():
        other.absolute_pos_embed.add_(1.0)
    enc.load_state_dict(other.state_dict())
    torch.testing.assert_close(enc.pos_embed(grid, masked=True), expected(), rtol=0, atol=0)
    enc.double()
    assert enc.pos_embed(grid, masked=True).dtype == torch.float64
    torch.testing.assert_close(enc.pos_embed(grid, masked=True), expected(), rtol=0, atol=0)
    # other grids (crops of another size) each get their own resampling
    assert enc.pos_embed((3, 5), masked=True).shape == (1, 15, enc.embed_dim)
    # a learnable table is resampled every time, so its gradient flows
    learnable = build_encoder(itpn_cfg(pos_embed="learnable"), 4, 2)
    for _ in range(2):
        learnable.forward_masked([("optical", opt)], ids)[0][0].sum().backward()
    assert learnable.absolute_pos_embed.grad is not None and learnable.absolute_pos_embed.grad.any()


def test_pyramid_and_layer_features_any_size():
    enc = build_encoder(itpn_cfg(), 4, 2).eval()
    opt, sar = random_pair(B=2, size=48)
    pyr = enc.forward_pyramid(optical=opt, sar=sar)
    assert [tuple(f.shape) for f in pyr["sar"]] == [(2, 32, 24, 24), (2, 32, 12, 12), (2, 32, 6, 6), (2, 32, 3, 3)]
    feats = enc.forward_features(optical=opt, layers=(1, 3))
    assert [tuple(f.shape) for f in feats["optical"]] == [(2, 64, 6, 6)] * 2
    # an encoder built for another crop size loads the checkpoint (the table is resampled)
    other = build_encoder(itpn_cfg(img_size=48), 4, 2)
    other.load_state_dict(enc.state_dict(), strict=True)


def test_segmentation_task_model_uses_the_pyramid():
    from codemae_cli.tasks.heads import build_head
    from codemae_cli.tasks.model import TaskModel, find_unused_parameters

    enc = build_encoder(itpn_cfg(), 4, 2)
    model = TaskModel(enc, build_head("segmentation", "upernet", enc.pyramid_dim, 3, neck_dim=16,
                                      multiscale_input=True), inputs="both")
    assert model.pyramid
    opt, sar = random_pair(B=2)
    out = model(optical=opt, sar=sar)
    assert out.shape == (2, 3, 32, 32)
    assert find_unused_parameters(model, 4, 2, 16) == []
    probe = TaskModel(build_encoder(itpn_cfg(), 4, 2), build_head("classification", "linear", 64, 5),
                      inputs="optical", freeze_encoder=True, task="classification")
    assert not probe.pyramid and probe(optical=opt).shape == (2, 5)


# -- initialisation from files -------------------------------------------------------------------
def _itpn_release(model) -> dict:
    """A random-weight iTPN encoder written with the ImageNet release's names (one RGB embedding)."""
    enc = model.encoder.state_dict()
    out = {k: v.clone() for k, v in enc.items() if not k.startswith("patch_embed.")}
    out["patch_embed.proj.weight"] = torch.randn(16, 3, 2, 2)
    out["patch_embed.proj.bias"] = torch.randn(16)
    out["patch_embed.norm.weight"] = torch.randn(16)
    out["patch_embed.norm.bias"] = torch.randn(16)
    out["mask_token"] = torch.randn(1, 1, 64)
    out["decoder_embed.0.1.weight"] = torch.randn(64, 32)
    return out


def test_itpn_init_from_file_round_trips(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model(itpn_cfg(), 3, 2)
    release = _itpn_release(source)
    path = tmp_path / "itpn_release.safetensors"
    save_file(release, str(path))
    torch.manual_seed(1)
    model = build_model(itpn_cfg(init_weights=str(path)), 3, 2)
    rep = model.init_report
    for k, v in model.encoder.state_dict().items():
        if k.startswith("patch_embed.optical."):
            torch.testing.assert_close(v, release[k.replace("patch_embed.optical.", "patch_embed.")])
        elif not k.startswith("patch_embed.sar."):
            torch.testing.assert_close(v, release[k])
    # the SAR embedding (2 bands) is adapted from the RGB one; decoders and masks are skipped
    assert rep.adapted == ["patch_embed.sar.proj.weight"]
    assert model.encoder.patch_embed.sar.proj.weight.shape == (16, 2, 2, 2)
    assert set(rep.skipped) == {"mask_token", "decoder_embed.0.1.weight"}
    assert rep.missing == [] and rep.unexpected == []
    # the EMA teacher starts from the initialised student
    t = model.teacher.encoder.state_dict()
    torch.testing.assert_close(t["blocks.5.attn.qkv.weight"], release["blocks.5.attn.qkv.weight"])


def test_vit_init_from_a_timm_file_and_pth_weights_only(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=4, num_heads=3)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "img_size": 32, "patch_size": 8,
                                                "init_weights": str(tmp_path / "vit.pth")}), 4, 1)
    rep = model.init_report
    torch.testing.assert_close(model.encoder.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)
    torch.testing.assert_close(model.encoder.norm.weight, vit.norm.weight)
    assert sorted(rep.adapted) == ["patch_embed.optical.proj.weight", "patch_embed.sar.proj.weight"]
    assert {"pos_embed", "cls_token"} <= set(rep.skipped) and rep.missing == []
    # a pickled object other than plain weights is refused, not executed
    torch.save({"model": vit.state_dict(), "args": object()}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="weights-only"):
        build_model(from_dict(ModelConfig, {"preset": "tiny", "img_size": 32, "patch_size": 8,
                                            "init_weights": str(tmp_path / "bad.pth")}), 4, 1)
    # weights of the other backbone are refused with one sentence
    with pytest.raises(UserError, match="do not fit|no itpn trunk"):
        build_model(itpn_cfg(init_weights=str(tmp_path / "vit.pth")), 4, 1)


# -- the published CoDe-MAE checkpoint ------------------------------------------------------------
def test_reference_import_equals_a_direct_forward(tmp_path):
    from safetensors.torch import save_file

    from codemae_cli.tasks.import_weights import TEACHERS, import_reference_checkpoint
    from codemae_cli.train.checkpoint import load_checkpoint

    ref = reference_state(seed=3, c={**REF_TINY, "teacher": 384})
    src = tmp_path / "codemae_ref.safetensors"
    save_file(ref, str(src))
    res = import_reference_checkpoint(src, tmp_path / "run" / "checkpoints" / "last")
    assert (res.preset, res.img_size, res.patch_size, res.optical_bands, res.sar_bands) == ("tiny", 32, 8, 3, 3)
    assert res.dropped == [] and TEACHERS[384]
    state, meta = load_checkpoint(res.checkpoint)
    assert meta["kind"] == "pretrain" and meta["recipe"]["model"]["backbone"] == "itpn"
    cfg = from_dict(ModelConfig, {**meta["recipe"]["model"], "okd": {"enabled": False}})
    model = build_model(cfg, 3, 3).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("okd_")}, strict=True)
    opt, sar = random_pair(B=2, co=3, cs=3, seed=5)
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    with torch.no_grad():
        levels, _ = model.encoder.forward_masked([("optical", opt), ("sar", sar)], ids_keep)
        h = model.decoder_embed(levels)
        want = [torch.cat(pair_) for pair_ in zip(reference_levels(ref, opt, "optical", ids_keep),
                                                   reference_levels(ref, sar, "sar", ids_keep), strict=True)]
        for a, b in zip(levels, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, reference_decoder_tokens(ref, want), rtol=1e-4, atol=1e-4)
        # unmasked (fine-tuning, analysis): the table as it is
        pyr = model.encoder.forward_pyramid(optical=opt)["optical"][0]
        finest = reference_levels(ref, opt, "optical")[2]
        torch.testing.assert_close(pyr, finest.reshape(2, 4, 4, 4, 4, -1).permute(0, 5, 1, 3, 2, 4).reshape(2, -1, 16, 16),
                                   rtol=1e-4, atol=1e-4)
    # one mask token per level in the reference: codemae's single token carries their sum
    torch.testing.assert_close(state["self_decoder.mask_token"], 3 * ref["mask_token"])


def test_reference_import_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    from codemae_cli.tasks.import_weights import import_reference_checkpoint

    save_file({"blocks.0.norm1.weight": torch.ones(4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="not a CoDe-MAE iTPN checkpoint"):
        import_reference_checkpoint(tmp_path / "x.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- pretraining run, resume and downstream on iTPN -----------------------------------------------
def test_itpn_pretrain_resumes_then_finetunes_with_the_pyramid_and_probes(tmp_path):
    from pathlib import Path

    from fakes import make_synthetic_dataset
    from typer.testing import CliRunner

    from codemae_cli.cli import app
    from codemae_cli.tasks.model_io import build_task_model_from_checkpoint

    root = Path(__file__).resolve().parents[1]
    data = make_synthetic_dataset(tmp_path / "data", n_chips=8, tile=32, seed=3, labels=True, n_val=2)
    runner = CliRunner()
    sets = ["model.backbone=itpn", "model.preset=tiny", "model.img_size=32", "data.img_size=32",
            "model.patch_size=8", "model.ccl.num_heads=4", "model.okd.teacher=ema", "optim.batch_size=2",
            "run.device=cpu", "run.precision=fp32", "run.tensorboard=false", "data.num_workers=0",
            "data.pin_memory=false", f"data.datasets=[{data}]", "run.ckpt_every=2"]

    def pretrain(*extra, resume=False):
        args = ["pretrain", str(root / "recipes" / "smoke.yaml"), "--output-dir", str(tmp_path / "pre")]
        args += ["--resume"] if resume else []
        for s in sets + list(extra):
            args += ["--set", s]
        return runner.invoke(app, args)

    res = pretrain("optim.max_steps=2")
    assert res.exit_code == 0, res.output
    assert pretrain("optim.max_steps=3").exit_code == 2  # a run with checkpoints is resumed explicitly
    res = pretrain("optim.max_steps=3", resume=True)
    assert res.exit_code == 0 and "resumed from" in res.output, res.output

    for head, probe in (("upernet", False), ("linear", True)):
        ft = ["finetune", str(root / "recipes" / "seg.yaml"), "--set", f"task.pretrained={tmp_path / 'pre'}",
              "--set", f"data.datasets=[{data}]", "--set", "model.img_size=32", "--set", "data.img_size=32",
              "--set", f"task.head={head}", "--set", f"task.linear_probe={str(probe).lower()}",
              "--set", "task.neck_dim=16", "--set", "optim.batch_size=2", "--set", "optim.max_steps=2",
              "--set", "optim.epochs=1", "--set", "run.device=cpu", "--set", "run.precision=fp32",
              "--set", "run.tensorboard=false", "--set", "data.num_workers=0", "--set", "data.pin_memory=false",
              "--set", f"run.output_dir={tmp_path / head}"]
        res = runner.invoke(app, ft)
        assert res.exit_code == 0, res.output
        model, meta = build_task_model_from_checkpoint(tmp_path / head)
        assert meta.backbone == meta.encoder_config["backbone"] == "itpn" and model.pyramid == (head == "upernet")
        with torch.no_grad():
            logits = model(optical=torch.randn(1, 3, 32, 32), sar=torch.randn(1, 2, 32, 32))
        assert logits.shape[-2:] == (32, 32)


def test_finetune_recipe_picks_the_backbone_from_scratch_or_refuses_a_mismatch():
    from codemae_cli.tasks.config import FinetuneRecipe
    from codemae_cli.tasks.model_io import encoder_config
    from codemae_cli.train.checkpoint import CheckpointMeta

    raw = {"data": {"datasets": ["d"], "img_size": 32}, "model": {"backbone": "itpn", "preset": "tiny", "patch_size": 8, "img_size": 32},
           "task": {"from_scratch": True}}
    assert encoder_config(from_dict(FinetuneRecipe, raw)).backbone == "itpn"
    raw["model"]["backbone"] = None
    assert encoder_config(from_dict(FinetuneRecipe, raw)).backbone == "vit"
    raw["model"]["backbone"] = "vit"
    pre = CheckpointMeta.from_dict({"kind": "pretrain", "recipe": {"model": {"backbone": "itpn", "preset": "tiny",
                                                                       "patch_size": 8}}}, Path("pre"))
    with pytest.raises(UserError, match="backbone 'itpn'"):
        encoder_config(from_dict(FinetuneRecipe, raw), pre)
