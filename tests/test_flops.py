"""The analytic FLOP count against torch.utils.flop_counter.FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from codemae_cli.config import from_dict
from codemae_cli.model import ModelConfig, build_model, build_plain_mae
from codemae_cli.model.flops import mae_step_flops, pretrain_step_breakdown, pretrain_step_flops

torch.set_num_threads(1)


def measured(model, *inputs) -> int:
    # Plain attention (fused_attn=False): CPU's fused SDPA kernel is not counted by FlopCounterMode.
    with FlopCounterMode(display=False) as fc:
        out = model(*inputs)
        out["loss"].backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("over", [
    {},  # EMA teacher, conditioned CCL, channel CDR
    {"okd": {"teacher": "timm", "teacher_model": "vit_small_patch16_dinov3", "sar_side": True}},
    {"ccl": {"mode": "rigid"}, "cdr": {"degradation": "none"}, "okd": {"aux_head": False}},
    {"okd": {"enabled": False}, "ccl": {"mode": "off"}, "cdr": {"enabled": False}, "mask_ratio": 0.6},
])
def test_pretrain_step_flops_match_flop_counter(over):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": "tiny", "img_size": 32, "patch_size": 8, "fused_attn": False, **over})
    model = build_model(cfg, 4, 2)
    B = 3
    counted = measured(model, torch.randn(B, 4, 32, 32), torch.randn(B, 2, 32, 32))
    analytic = pretrain_step_flops(cfg, 4, 2, B)
    assert analytic == pytest.approx(counted, rel=0.03)


@pytest.mark.parametrize("over", [
    {},  # EMA teacher, conditioned CCL, channel CDR
    {"ccl": {"mode": "rigid"}, "okd": {"aux_head": False, "sar_side": True}},
    {"okd": {"enabled": False}, "ccl": {"mode": "off"}, "cdr": {"enabled": False}, "mask_ratio": 0.5},
])
def test_itpn_step_flops_match_flop_counter(over):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"backbone": "itpn", "preset": "tiny", "img_size": 32, "patch_size": 8,
                                  "fused_attn": False, **over})
    model = build_model(cfg, 4, 2)
    counted = measured(model, torch.randn(3, 4, 32, 32), torch.randn(3, 2, 32, 32))
    assert pretrain_step_flops(cfg, 4, 2, 3) == pytest.approx(counted, rel=0.03)
    base = pretrain_step_breakdown(from_dict(ModelConfig, {"backbone": "itpn", "preset": "base"}), 3, 2, 1)
    assert "neck" in base and base["trunk"] > base["neck"]


def test_plain_mae_flops_match_flop_counter_and_reference():
    mae = build_plain_mae("tiny", 3, 32, 8, fused_attn=False)
    counted = measured(mae, torch.randn(2, 3, 32, 32))
    assert mae_step_flops("tiny", 3, 2, 32, 8) == pytest.approx(counted, rel=0.03)
    # design reference: plain MAE ViT-B/16, 224 px, 75 % mask, 8x512 decoder ~ 58.7 GFLOP/image/step
    assert mae_step_flops("base", 3, 1) / 1e9 == pytest.approx(58.7, rel=0.03)


def test_breakdown_scales_and_names_components():
    cfg = ModelConfig(preset="base")
    one = pretrain_step_breakdown(cfg, 3, 2, 1)
    assert set(one) == {"patch_embed", "trunk", "decoder_embed", "self_decoder", "cdr", "okd", "teacher", "ccl"}
    assert pretrain_step_flops(cfg, 3, 2, 128) == pytest.approx(128 * pretrain_step_flops(cfg, 3, 2, 1), rel=1e-3)
    # the two decoders run over all tokens: each costs more than the masked trunk
    assert one["self_decoder"] > one["trunk"] and one["cdr"] > one["trunk"]
    # a ViT-L/16 teacher is counted forward-only from its real shapes
    large = from_dict(ModelConfig, {"okd": {"teacher": "timm", "teacher_model": "vit_large_patch16_dinov3"}})
    t = pretrain_step_breakdown(large, 3, 2, 1)["teacher"]
    assert 118e9 < t < 132e9  # ViT-L/16 forward on 196 + 5 tokens: ~62 G multiply-adds
