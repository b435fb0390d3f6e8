"""Heads and the task model: output shapes, gradients, fusion with a missing modality."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from codemae_cli.model.encoder import CoDeMAEEncoder  # noqa: E402
from codemae_cli.model.errors import ModelInputError  # noqa: E402
from codemae_cli.tasks.heads import build_head  # noqa: E402
from codemae_cli.tasks.model import TaskModel, find_unused_parameters  # noqa: E402

torch.set_num_threads(1)


def _encoder():
    return CoDeMAEEncoder(optical_bands=3, sar_bands=2, img_size=32, patch_size=8, embed_dim=32, depth=4,
                          num_heads=2)


@pytest.mark.parametrize("head", ["upernet", "fpn", "linear"])
def test_segmentation_heads_shape_at_input_resolution(head):
    h = build_head("segmentation", head, 32, 5, neck_dim=16)
    feats = [torch.randn(2, 32, 4, 6) for _ in range(4)]
    out = h(feats, out_size=(32, 48))
    assert out.shape == (2, 5, 32, 48)
    out.sum().backward()
    assert all(p.grad is not None for p in h.parameters())


@pytest.mark.parametrize("head", ["pool", "linear"])
def test_classification_heads(head):
    h = build_head("classification", head, 32, 7)
    out = h([torch.randn(3, 32, 4, 4) for _ in range(4)])
    assert out.shape == (3, 7)


@pytest.mark.parametrize("inputs", ["optical", "sar", "both"])
def test_task_model_inputs_and_gradients(inputs):
    torch.manual_seed(0)
    enc = _encoder()
    model = TaskModel(enc, build_head("segmentation", "upernet", 32, 3, neck_dim=16), inputs=inputs)
    opt, sar = torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32)
    logits = model(optical=opt, sar=sar)
    assert logits.shape == (2, 3, 32, 32)
    unused = find_unused_parameters(model, 3, 2, 16)
    # what the inputs never touch is exactly the other modality's patch embedding
    other = {"optical": "sar", "sar": "optical", "both": None}[inputs]
    if other is None:
        assert unused == []
    else:
        assert unused and all(n.startswith(f"encoder.patch_embed.{other}") for n in unused)


def test_fused_model_predicts_with_a_missing_modality():
    torch.manual_seed(0)
    for fusion in ("concat", "mean"):
        model = TaskModel(_encoder(), build_head("segmentation", "fpn", 32, 3, neck_dim=16), inputs="both",
                          fusion=fusion, modality_dropout=0.5).eval()
        opt, sar = torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32)
        both = model(optical=opt, sar=sar)
        only_opt = model(optical=opt)
        only_sar = model(sar=sar)
        assert only_opt.shape == only_sar.shape == both.shape
        assert not torch.allclose(only_opt, both)


def test_modality_dropout_keeps_absent_embedding_in_the_graph():
    torch.manual_seed(0)
    model = TaskModel(_encoder(), build_head("segmentation", "linear", 32, 3), inputs="both", fusion="concat",
                      modality_dropout=0.3).train()
    out = model(optical=torch.randn(4, 3, 32, 32), sar=torch.randn(4, 2, 32, 32))
    out.sum().backward()
    assert model.fusion.absent.grad is not None


def test_single_modality_model_refuses_the_wrong_input():
    model = TaskModel(_encoder(), build_head("classification", "linear", 32, 2), inputs="optical")
    with pytest.raises(ModelInputError, match="optical"):
        model(sar=torch.randn(1, 2, 32, 32))


def test_linear_probe_freezes_encoder_and_keeps_it_in_eval():
    model = TaskModel(_encoder(), build_head("classification", "linear", 32, 4), inputs="sar",
                      freeze_encoder=True).train()
    assert not model.encoder.training and model.head.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    out = model(sar=torch.randn(4, 2, 32, 32))
    out.sum().backward()
    assert model.head.classifier.weight.grad is not None
    # BatchNorm of the probe has no affine parameters (method.md linear probing)
    assert model.head.norm.weight is None
