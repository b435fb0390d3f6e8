"""CCL: InfoNCE limits, the conditioned module, and the cross-rank gather with gradients."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from codemae_cli.model.ccl import ConditionedContrast, info_nce
from codemae_cli.model.dist import gather_with_grad

torch.set_num_threads(1)


def test_info_nce_is_log_b_for_unrelated_embeddings():
    B, d = 8, 16
    # constant similarity: every optical row equally similar to every SAR row
    z = torch.nn.functional.normalize(torch.ones(B, d), dim=-1)
    assert info_nce(z, z, 0.07).item() == pytest.approx(math.log(B), rel=1e-5)
    # orthogonal: optical rows span one subspace, SAR rows another -> all logits 0
    eye = torch.eye(2 * B)
    assert info_nce(eye[:B], eye[B:], 0.07).item() == pytest.approx(math.log(B), rel=1e-5)


def test_info_nce_tends_to_zero_for_identical_separated_embeddings():
    B = 8
    z = torch.eye(B, 32)
    loss = info_nce(z, z, 0.07).item()
    assert loss < 1e-4
    assert loss == pytest.approx(math.log(1 + (B - 1) * math.exp(-1 / 0.07)), rel=5e-2)  # float32 round-off
    # and a lower temperature sharpens it further
    assert info_nce(z, z, 0.05).item() < loss


def test_conditioned_contrast_is_residual_and_trainable():
    torch.manual_seed(0)
    ccl = ConditionedContrast(32, num_heads=4)
    h_o, h_s = torch.randn(4, 5, 32, requires_grad=True), torch.randn(4, 5, 32, requires_grad=True)
    loss = ccl(h_o, h_s)
    loss.backward()
    assert torch.isfinite(loss)
    assert h_o.grad is not None and h_s.grad is not None
    assert all(p.grad is not None for p in ccl.parameters())
    # zeroed output projections make the block an identity: plain InfoNCE on pooled tokens
    with torch.no_grad():
        for ca in (ccl.cross_optical, ccl.cross_sar):
            ca.proj.weight.zero_()
            ca.proj.bias.zero_()
    zo = torch.nn.functional.normalize(h_o.mean(1), dim=-1)
    zs = torch.nn.functional.normalize(h_s.mean(1), dim=-1)
    torch.testing.assert_close(ccl(h_o, h_s), info_nce(zo, zs, 0.07))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B, d = 3, 4
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(B, d, generator=g, requires_grad=True)
        w = torch.randn(world * B, d, generator=torch.Generator().manual_seed(7))  # same on all ranks
        all_x = gather_with_grad(x)
        # each rank's loss weights the gathered rows differently
        loss = ((all_x * w).sum(dim=1) * (rank + 1)).sum()
        loss.backward()
        za = torch.nn.functional.normalize(x.detach() + 0.1 * rank, dim=-1).requires_grad_(True)
        zb = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).requires_grad_(True)
        nce = info_nce(za, zb, 0.1)
        # gather_grad=false against the reference code's form written out: plain all_gather
        # (no autograd), local rows as queries only
        grads = {}
        for mode in ("exact", "no_grad", "by_hand"):
            qa, qb = za.detach().clone().requires_grad_(True), zb.detach().clone().requires_grad_(True)
            if mode == "by_hand":
                parts_a = [torch.zeros_like(qa) for _ in range(world)]
                parts_b = [torch.zeros_like(qb) for _ in range(world)]
                dist.all_gather(parts_a, qa)
                dist.all_gather(parts_b, qb)
                all_a, all_b = torch.cat(parts_a), torch.cat(parts_b)
                labels = torch.arange(B) + B * rank
                ce = torch.nn.functional.cross_entropy
                loss_r = 0.5 * (ce(qa @ all_b.t() / 0.1, labels) + ce(qb @ all_a.t() / 0.1, labels))
            else:
                loss_r = info_nce(qa, qb, 0.1, gather_grad=mode == "exact")
            loss_r.backward()
            grads[mode] = (loss_r.detach(), qa.grad.detach(), qb.grad.detach())
        # teachers built independently per rank are aligned to rank 0 by sync_teacher()
        from codemae_cli.model import ModelConfig, build_model

        torch.manual_seed(rank)
        model = build_model(ModelConfig(preset="tiny", img_size=32, patch_size=8), 3, 2)
        before = model.teacher_state_dict()["encoder.blocks.0.attn.qkv.weight"].clone()
        model.sync_teacher()
        after = model.teacher_state_dict()["encoder.blocks.0.attn.qkv.weight"]
        result = dict(x=x.detach(), all_x=all_x.detach(), grad=x.grad.detach(), za=za.detach(),
                      zb=zb.detach(), nce=nce.detach(), teacher_before=before, teacher_after=after,
                      **{f"{mode}_{i}": t for mode, ts in grads.items() for i, t in enumerate(ts)})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_with_grad_two_processes(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)}
    xs = torch.cat([res[r]["x"] for r in range(world)])
    for r in range(world):
        torch.testing.assert_close(res[r]["all_x"], xs)  # rank order
    w = torch.randn(world * 3, 4, generator=torch.Generator().manual_seed(7))
    # d(sum over ranks of loss_r)/d x_r = sum_r' (r'+1) * w[rows of r]
    scale = sum(r + 1 for r in range(world))
    for r in range(world):
        torch.testing.assert_close(res[r]["grad"], scale * w[3 * r : 3 * r + 3])
    assert not torch.equal(res[0]["teacher_before"], res[1]["teacher_before"])
    torch.testing.assert_close(res[1]["teacher_after"], res[0]["teacher_before"], rtol=0, atol=0)
    # InfoNCE with gathered negatives equals the single-process loss over the global batch, per rank slice
    za = torch.cat([res[r]["za"] for r in range(world)])
    zb = torch.cat([res[r]["zb"] for r in range(world)])
    for r in range(world):
        logits_ab = za[3 * r : 3 * r + 3] @ zb.t() / 0.1
        logits_ba = zb[3 * r : 3 * r + 3] @ za.t() / 0.1
        labels = torch.arange(3) + 3 * r
        ce = torch.nn.functional.cross_entropy
        expected = 0.5 * (ce(logits_ab, labels) + ce(logits_ba, labels))
        torch.testing.assert_close(res[r]["nce"], expected)
    # gather_grad=false: loss and gradient of the reference's no-grad all_gather, per rank; the
    # exact gradient differs from it (negatives of the other rank push back on this rank's rows)
    for r in range(world):
        for i in range(3):
            torch.testing.assert_close(res[r][f"no_grad_{i}"], res[r][f"by_hand_{i}"])
        torch.testing.assert_close(res[r]["no_grad_0"], res[r]["exact_0"])
        assert not torch.allclose(res[r]["no_grad_1"], res[r]["exact_1"], atol=1e-4)


def test_gather_is_identity_without_distributed():
    x = torch.randn(2, 3, requires_grad=True)
    assert gather_with_grad(x) is x
