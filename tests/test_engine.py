"""Engine pieces: parameter groups, lr scaling and schedule, precision, seeding, NaN guard,
distributed helpers in a single process, metrics logging."""

from __future__ import annotations

import json
import math

import pytest
import torch

from codemae_cli.errors import UserError
from codemae_cli.train.config import OptimConfig
from codemae_cli.train.distributed import all_reduce_mean, init_distributed
from codemae_cli.train.engine import (
    NonFiniteLossError,
    autocast,
    resolve_precision,
    step_seed,
)
from codemae_cli.train.logging import MetricsLogger
from codemae_cli.train.optim import WarmupCosine, build_optimizer, param_groups, scaled_lr


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_no_decay_on_norms_biases_pos_embed_tokens():
    net = _Net()
    groups = param_groups(net, 0.05)
    decay = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(decay) == 1 and decay[0] is net.proj.weight
    ids = {id(p) for p in no_decay}
    for p in (net.pos_embed, net.cls_token, net.proj.bias, net.norm.weight, net.norm.bias):
        assert id(p) in ids
    assert id(net.frozen.weight) not in ids | {id(p) for p in decay}, "frozen parameters must be skipped"
    opt = build_optimizer(net, OptimConfig(betas=(0.9, 0.95)), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def test_scaled_lr_counts_both_modalities_and_processes():
    cfg = OptimConfig(blr=1.5e-4, batch_size=128, accum_steps=2)
    assert scaled_lr(cfg, world_size=4, samples_per_item=2) == pytest.approx(1.5e-4 * 128 * 2 * 4 * 2 / 256)
    assert scaled_lr(OptimConfig(lr=3e-4), world_size=8, samples_per_item=2) == 3e-4


def test_warmup_cosine_schedule():
    s = WarmupCosine(1.0, 0.1, warmup_steps=10, total_steps=110)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)
    values = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True)), "cosine phase must not increase"
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.5}], lr=1)
    assert s.apply(opt, 5) == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_precision_and_autocast():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(torch.device("cuda", 0), "auto") == "bf16"
    assert resolve_precision(cpu, "fp16") == "fp16"  # slow on CPU, but the same scaler path as on a GPU
    with pytest.raises(UserError):
        resolve_precision(cpu, "fp8")
    with autocast(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_nan_error_is_a_user_error_every_rank_raises():
    assert issubclass(NonFiniteLossError, UserError) and NonFiniteLossError.all_ranks


def test_step_seed_depends_on_every_part():
    seeds = {step_seed(0, r, s, m) for r in range(2) for s in range(20) for m in range(2)}
    assert len(seeds) == 80 and all(0 <= x < 2**63 for x in seeds)
    assert step_seed(1, 0, 5, 0) == step_seed(1, 0, 5, 0)


def test_single_process_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(all_reduce_mean(t), t)
    with pytest.raises(UserError, match="environment variable"):
        monkeypatch.setenv("WORLD_SIZE", "two")
        init_distributed("cpu")


def test_metrics_logger_jsonl_truncate_and_plot(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step, "loss_ccl": torch.tensor(0.5 / step), "lr": 0.1})
    log.log(5, {"loss": 0.3}, split="val")
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5] and rows[1]["loss_ccl"] == pytest.approx(0.25)
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    png = log.plot(tmp_path / "curve.png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    silent = MetricsLogger(tmp_path / "other", is_main=False)
    silent.log(1, {"loss": math.nan})
    assert not (tmp_path / "other").exists()
