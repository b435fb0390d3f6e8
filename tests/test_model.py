"""Contracts of the CoDe-MAE model: shapes, masking, gradients, switches, encoder features."""

from __future__ import annotations

import pytest
import torch
from fakes import random_pair, tiny_model_config

from codemae_cli.config import from_dict
from codemae_cli.errors import UserError
from codemae_cli.model import (
    PRESETS,
    ModelConfig,
    build_encoder,
    build_model,
    build_plain_mae,
    random_masking,
)
from codemae_cli.model.ccl import info_nce, pooled_embedding
from codemae_cli.model.errors import ModelInputError
from codemae_cli.model.targets import DEGRADATIONS

torch.set_num_threads(1)

def test_tiny_forward_shapes_and_losses():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), optical_bands=4, sar_bands=2)
    opt, sar = random_pair()
    out = model(opt, sar)
    assert set(out["losses"]) == {"self_optical", "self_sar", "cdr", "okd", "ccl"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out["losses"].values())
    N = (32 // 8) ** 2
    assert out["mask"].shape == (3, N)
    assert out["pred_self_optical"].shape == (3, N, 4 * 8 * 8)
    assert out["pred_self_sar"].shape == (3, N, 2 * 8 * 8)
    # channel degradation: one channel, p*p values per patch in both directions
    assert out["pred_cdr_sar"].shape == (3, N, 64) and out["pred_cdr_optical"].shape == (3, N, 64)
    w = model.loss_weights(1.0)
    expected = sum(w[k] * v for k, v in out["losses"].items())
    torch.testing.assert_close(out["loss"], expected)


def test_masks_identical_across_modalities_with_int_visible_count():
    ids_keep, ids_restore, mask = random_masking(5, 196, 0.75, "cpu")
    n_keep = int(196 * (1 - 0.75))
    assert ids_keep.shape == (5, n_keep)
    assert (mask.sum(1) == 196 - n_keep).all()
    # visible patches of the mask are exactly ids_keep; ids_restore inverts the shuffle
    for b in range(5):
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(ids_keep[b].tolist())
    # the model encodes optical and SAR with the same ids (one 2B batch)
    model = build_model(tiny_model_config(), 4, 2)
    seen = {}
    orig = model.encoder.forward_masked

    def spy(images, ids_keep, aux_layer=None):
        seen["modalities"] = [m for m, _ in images]
        seen["ids"] = ids_keep
        latent, aux = orig(images, ids_keep, aux_layer)
        seen["latent"] = latent
        return latent, aux

    model.encoder.forward_masked = spy
    opt, sar = random_pair(B=2)
    out = model(opt, sar)
    assert seen["modalities"] == ["optical", "sar"]
    assert seen["latent"].shape == (4, int(16 * 0.25), 192)  # 2B visible tokens
    vis = torch.nonzero(out["mask"] == 0)[:, 1].reshape(2, -1)
    assert torch.equal(vis.sort(1).values, seen["ids"].sort(1).values)


@pytest.mark.parametrize("teacher", ["ema", "timm"])
def test_every_trainable_param_gets_a_grad_and_the_teacher_none(teacher):
    torch.manual_seed(0)
    okd = {"teacher": teacher, "teacher_model": "vit_small_patch16_dinov3", "sar_side": True}
    model = build_model(tiny_model_config(okd=okd), 4, 2)
    opt, sar = random_pair()
    model(opt, sar)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert zero == []
    assert model.teacher is not None
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    # the teacher is not part of the module tree / checkpoint
    assert not any("teacher" in k for k in model.state_dict())
    assert all(k.split(".")[0] != "_teacher" for k, _ in model.named_parameters())


def test_unpaired_batches_zero_ccl_and_cdr_but_keep_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), 4, 2)
    opt, sar = random_pair()
    torch.manual_seed(1)
    out = model(opt, sar, paired=False)
    terms = out["losses"]
    expected = 0.5 * (terms["self_optical"] + terms["self_sar"]) + terms["okd"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # a tensor flag works too (no host sync needed)
    out = model(opt, sar, paired=torch.tensor([True, False, True]))
    torch.testing.assert_close(out["loss"], 0.5 * (out["losses"]["self_optical"] + out["losses"]["self_sar"])
                               + out["losses"]["okd"])


def test_switched_off_components_create_no_parameters():
    full = build_model(tiny_model_config(), 3, 1)
    plain = build_model(tiny_model_config(okd={"enabled": False}, ccl={"mode": "off"}, cdr={"enabled": False}), 3, 1)
    names = {n.split(".")[0] for n, _ in plain.named_parameters()}
    assert names == {"encoder", "decoder_embed", "self_decoder", "self_heads"}
    assert plain.teacher is None
    out = plain(*random_pair(co=3, cs=1))
    assert set(out["losses"]) == {"self_optical", "self_sar"}
    rigid = build_model(tiny_model_config(ccl={"mode": "rigid"}), 3, 1)
    assert not any(n.startswith("ccl") for n, _ in rigid.named_parameters())
    assert "ccl" in rigid(*random_pair(co=3, cs=1))["losses"]
    no_aux = build_model(tiny_model_config(okd={"aux_head": False}), 3, 1)
    assert not any("okd_aux" in n for n, _ in no_aux.named_parameters())
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in no_aux.parameters())


@pytest.mark.parametrize("deg", DEGRADATIONS)
def test_every_degradation_trains(deg):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(cdr={"degradation": deg}, okd={"enabled": False}), 4, 2)
    out = model(*random_pair(B=2))
    assert torch.isfinite(out["losses"]["cdr"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_presets_param_counts_on_meta_device():
    counts = {}
    for name, spec in PRESETS.items():
        cfg = ModelConfig(preset=name)
        with torch.device("meta"):
            model = build_model(cfg, 3, 2)
        enc = model.encoder
        assert enc.embed_dim == spec["embed_dim"] and enc.depth == spec["depth"] and enc.patch_size == 16
        counts[name] = sum(p.numel() for p in enc.parameters())
    # base trunk = ViT-B/16 (85.8 M without cls token/head) plus the SAR patch embedding
    vit_b = 12 * (4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768) + 2 * 768
    embeds = 768 * (3 * 256 + 1) + 768 * (2 * 256 + 1)
    assert counts["base"] == vit_b + embeds
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"]
    # reference decoder: 8 blocks x 512 wide, 16 heads
    with torch.device("meta"):
        m = build_model(ModelConfig(preset="base"), 3, 2)
    assert len(m.self_decoder.blocks) == 8 and m.self_decoder.dim == 512
    assert m.self_decoder.blocks[0].attn.num_heads == 16
    assert len(m.cross_decoder.blocks) == 8


def test_encoder_features_any_size_and_state_dict_prefix():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), 4, 2)
    enc = model.encoder
    assert enc.default_layers == (0, 1, 2, 3)
    feats = enc.forward_features(optical=torch.randn(2, 4, 48, 64), sar=torch.randn(2, 2, 48, 64), layers=(1, 3))
    assert [f.shape for f in feats["optical"]] == [(2, 192, 6, 8)] * 2
    assert [f.shape for f in feats["sar"]] == [(2, 192, 6, 8)] * 2
    only_sar = enc.forward_features(sar=torch.randn(1, 2, 32, 32))
    assert list(only_sar) == ["sar"] and len(only_sar["sar"]) == 4
    # a pair through one batch equals each modality alone
    o = torch.randn(1, 4, 32, 32)
    s = torch.randn(1, 2, 32, 32)
    enc.eval()
    both = enc.forward_features(optical=o, sar=s, layers=(3,))
    alone = enc.forward_features(optical=o, layers=(3,))
    torch.testing.assert_close(both["optical"][0], alone["optical"][0], atol=1e-5, rtol=1e-5)
    sd = model.state_dict()
    enc_keys = {k for k in sd if k.startswith("encoder.")}
    assert {"encoder." + k for k in model.encoder_state_dict()} == enc_keys
    standalone = build_encoder(tiny_model_config(), 4, 2)
    standalone.load_state_dict(model.encoder_state_dict())
    # fixed sin-cos tables are rebuilt, not stored: a fine-tuning encoder for another crop size loads strictly
    assert not any("pos_embed" in k for k in sd)
    build_encoder(tiny_model_config(img_size=64), 4, 2).load_state_dict(model.encoder_state_dict())
    with pytest.raises(ModelInputError, match="divisible"):
        enc.forward_features(optical=torch.randn(1, 4, 30, 32))
    with pytest.raises(ModelInputError, match="bands"):
        enc.forward_features(optical=torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelInputError, match="layer index"):
        enc.forward_features(optical=o, layers=(4,))


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    fused = build_model(tiny_model_config(okd={"enabled": False}), 4, 2).eval()
    plain = build_model(tiny_model_config(okd={"enabled": False}, fused_attn=False), 4, 2).eval()
    plain.load_state_dict(fused.state_dict())
    opt, sar = random_pair()
    a = fused.encoder.forward_features(optical=opt, sar=sar)
    b = plain.encoder.forward_features(optical=opt, sar=sar)
    for x, y in zip(a["optical"] + a["sar"], b["optical"] + b["sar"], strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    torch.manual_seed(3)
    la = fused(opt, sar)["loss"]
    torch.manual_seed(3)
    lb = plain(opt, sar)["loss"]
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_config_loads_strictly_and_validates():
    cfg = from_dict(ModelConfig, {"preset": "small", "okd": {"teacher": "ema"}, "ccl": {"mode": "rigid"}})
    assert cfg.ccl.mode == "rigid" and cfg.okd.teacher == "ema"
    with pytest.raises(UserError, match="did you mean"):
        from_dict(ModelConfig, {"okd": {"teachr": "ema"}})
    with pytest.raises(UserError, match="divisible"):
        from_dict(ModelConfig, {"img_size": 100})
    with pytest.raises(UserError, match="teacher_weights"):
        from_dict(ModelConfig, {"okd": {"teacher": "file"}})
    with pytest.raises(UserError, match="num_heads"):
        from_dict(ModelConfig, {"preset": "tiny", "ccl": {"num_heads": 5}})
    with pytest.raises(UserError, match="mask_ratio"):
        from_dict(ModelConfig, {"mask_ratio": 1.0})
    with pytest.raises(UserError):
        from_dict(ModelConfig, {"cdr": {"degradation": "blur"}})
    with pytest.raises(UserError, match="band"):
        build_model(tiny_model_config(), 3, 0)


def test_plain_mae_baseline_trains():
    torch.manual_seed(0)
    mae = build_plain_mae("tiny", in_chans=3, img_size=32, patch_size=8)
    out = mae(torch.randn(2, 3, 32, 32))
    out["loss"].backward()
    assert all(p.grad is not None for p in mae.parameters() if p.requires_grad)
    assert "sar" not in mae.encoder.patch_embed


def test_tiny_model_overfits_one_batch():
    """A short optimisation on one fixed batch lowers the total loss (the losses are learnable)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), 3, 2)
    opt, sar = random_pair(B=4, co=3)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(0)  # same mask every step
        out = model(opt, sar)
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        model.update_teacher()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_rigid_contrast_placement_switch():
    """rigid_on=decoder_embed puts the plain InfoNCE on the decoder-embedding projection (the
    reference's placement); the default stays on the encoder output."""
    seen = {}
    for where in ("encoder", "decoder_embed"):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(ccl={"mode": "rigid", "rigid_on": where}, okd={"enabled": False},
                                     cdr={"enabled": False}), 4, 2)
        model.decoder_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
        model.encoder.forward_masked = _keep_output(model.encoder.forward_masked, seen)
        out = model(*random_pair(B=3))
        x = seen["h"] if where == "decoder_embed" else seen["latent"]
        expected = info_nce(pooled_embedding(x[:3]), pooled_embedding(x[3:]), 0.07)
        torch.testing.assert_close(out["losses"]["ccl"], expected)
        assert seen["h"].shape[-1] != seen["latent"].shape[-1]  # two different places


def _keep_output(fn, store):
    def wrapped(*args, **kwargs):
        latent, aux = fn(*args, **kwargs)
        store["latent"] = latent
        return latent, aux
    return wrapped


def test_learnable_position_embedding_switch():
    torch.manual_seed(0)
    fixed = build_model(tiny_model_config(okd={"enabled": False}), 4, 2)
    assert "encoder.pos_embed" not in fixed.state_dict()
    model = build_model(tiny_model_config(pos_embed="learnable", okd={"enabled": False}), 4, 2)
    pos = model.encoder.pos_embed
    assert isinstance(pos, torch.nn.Parameter) and pos.requires_grad
    torch.testing.assert_close(pos.detach(), fixed.encoder.pos_embed)  # sin-cos initialised
    model(*random_pair(B=2))["loss"].backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    assert "encoder.pos_embed" in model.no_weight_decay()
    from codemae_cli.train.optim import param_groups

    groups = param_groups(model, 0.05)
    assert any(g["weight_decay"] == 0.0 and any(p is pos for p in g["params"]) for g in groups)
    # an encoder for another crop size loads the table resampled to its own grid
    with torch.no_grad():
        pos.add_(torch.randn_like(pos))
    other = build_encoder(tiny_model_config(pos_embed="learnable", img_size=48), 4, 2)
    other.load_state_dict(model.encoder_state_dict(), strict=True)
    assert other.pos_embed.shape == (1, 36, 192)
    from codemae_cli.model.layers import resize_pos_embed

    torch.testing.assert_close(other.pos_embed.detach(), resize_pos_embed(pos.detach(), (4, 4), (6, 6)))


def test_learnable_position_embedding_switch_itpn():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(backbone="itpn", pos_embed="learnable", okd={"enabled": False}), 3, 2)
    table = model.encoder.absolute_pos_embed
    assert isinstance(table, torch.nn.Parameter)
    model(*random_pair(B=2, co=3))["loss"].backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
