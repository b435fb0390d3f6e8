"""OKD teachers: local safetensors file, timm model, EMA copy; targets and resume state."""

from __future__ import annotations

import pytest
import torch

from codemae_cli.config import from_dict
from codemae_cli.errors import UserError
from codemae_cli.model import ModelConfig, build_model
from codemae_cli.model.teacher import TimmTeacher, teacher_targets

torch.set_num_threads(1)

TEACHER = "vit_small_patch16_dinov3"


def cfg_with(**okd) -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "tiny", "img_size": 32, "patch_size": 8, "okd": okd})


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model(TEACHER, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "dinov3_small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.state_dict()


def test_teacher_loaded_from_local_safetensors(weights_file):
    path, reference = weights_file
    model = build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(path)), 3, 2)
    teacher = model.teacher
    assert isinstance(teacher, TimmTeacher)
    assert teacher.dim == 384 and teacher.num_prefix_tokens == 5
    loaded = teacher.model.state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(loaded[k], v)
    # the input statistics are the teacher's own (pretrained_cfg), not the dataset's
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor(teacher.model.pretrained_cfg["mean"]))
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32))
    assert torch.isfinite(out["losses"]["okd"])
    assert model.teacher_state_dict() == {}  # frozen teachers are rebuilt from the file


def test_teacher_file_errors(tmp_path, weights_file):
    with pytest.raises(UserError, match="does not exist"):
        build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(tmp_path / "x.safetensors")), 3, 2)
    pickle = tmp_path / "w.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(UserError, match="safetensors"):
        build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(pickle)), 3, 2)
    path, _ = weights_file
    with pytest.raises(UserError, match="does not fit"):  # another DINOv3 ViT (SwiGLU MLPs), 1/4 of a base's cost
        build_model(cfg_with(teacher="file", teacher_model="vit_small_plus_patch16_dinov3", teacher_weights=str(path)),
                    3, 2)
    with pytest.raises(UserError, match="not a timm model"):
        build_model(cfg_with(teacher="timm", teacher_model="no_such_model_xyz"), 3, 2)
    with pytest.raises(UserError, match="teacher_bands"):
        build_model(cfg_with(teacher="timm", teacher_model=TEACHER), 2, 2)


def test_teacher_input_and_targets():
    torch.manual_seed(0)
    model = build_model(cfg_with(teacher="timm", teacher_model=TEACHER, teacher_bands=[2, 1, 0]), 4, 2)
    teacher = model.teacher
    optical = torch.rand(2, 4, 32, 32)  # source scale in [0, 1]
    x = teacher.prepare(optical)
    # bands 2,1,0 as they are (no per-image stretch), then the teacher's own mean/std
    torch.testing.assert_close(x * teacher.std + teacher.mean, optical[:, [2, 1, 0]])
    # teacher grid 2x2 (patch 16) resampled to the student's 4x4 grid, prefix tokens dropped
    t = teacher_targets(teacher, optical, (4, 4))
    assert t.shape == (2, 16, 384)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)  # LN without affine
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
    tokens, grid = teacher(optical)
    assert grid == (2, 2) and tokens.shape == (2, 4, 384)


def test_ema_teacher_update_and_resume_state():
    torch.manual_seed(0)
    model = build_model(cfg_with(teacher="ema", ema_momentum=0.5), 3, 2)
    teacher = model.teacher
    t0 = {k: v.clone() for k, v in model.teacher_state_dict().items()}
    # starts as an exact copy of the student's optical path (no SAR patch embedding)
    student = model.encoder.state_dict()
    assert all(torch.equal(v, student[k.removeprefix("encoder.")]) for k, v in t0.items())
    assert not any("patch_embed.sar" in k for k in t0)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher()
    t1 = model.teacher_state_dict()
    key = "encoder.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(t1[key], 0.5 * t0[key] + 0.5 * (t0[key] + 1.0))
    # resume: a fresh model takes the saved EMA weights
    other = build_model(cfg_with(teacher="ema", ema_momentum=0.5), 3, 2)
    other.load_teacher_state_dict(t1)
    torch.testing.assert_close(other.teacher_state_dict()[key], t1[key])
    assert teacher is model.teacher
    # the EMA teacher follows .to(): dtype conversion reaches it
    model.to(torch.float64)
    assert next(model.teacher.parameters()).dtype == torch.float64
