"""The head registry: every registered head passes `tmass check-head`, trains, evaluates and
reaches every place that names heads; a leaky head fails the check."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from tmass.cli import main
from tmass.train import registry
from tmass.train.heads import RetrievalHead, TextFeatures, VideoFeatures
from tmass.train.heads.base import logit_scale_parameter
from tmass.train.registry import BaseHeadConfig, HeadSpec, display_name, head_names, head_spec
from tmass.train.trainer import load_checkpoint


@pytest.mark.parametrize("name", head_names())
def test_every_registered_head_passes_check_head(name):
    result = CliRunner().invoke(main, ["check-head", name])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and f"{name}: all" in result.output
    for prop in ("chance", "sizes", "permutation", "chunks", "seed"):
        assert f"PASS  {prop}" in result.output
    for fast_path in head_spec(name).fast_paths:  # the fast path agrees with the head's own scoring
        assert f"PASS  fast path {fast_path}" in result.output


@dataclass
class _LeakyConfig(BaseHeadConfig):
    head: str = "leaky"


class _LeakyHead(RetrievalHead):
    """Centres each caption on the captions it happens to be scored with: a leak through
    the chunk, as a batch-normalised text tower would have."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def score(self, text: TextFeatures, video: VideoFeatures, eps=None) -> torch.Tensor:
        t = text.embedding - text.embedding.mean(0, keepdim=True)
        return F.normalize(t, dim=-1) @ F.normalize(video.frames.mean(1), dim=-1).T


class _BrokenHead(_LeakyHead):
    def score(self, text, video, eps=None):
        raise RuntimeError("scores of the wrong shape")


LEAKY = HeadSpec("leaky", "Leaky toy", _LeakyConfig, _LeakyHead)
BROKEN = HeadSpec("broken", "Broken toy", _LeakyConfig, _BrokenHead)


def test_a_leaky_head_fails_check_head_and_is_named(monkeypatch):
    monkeypatch.setitem(registry.HEADS, "leaky", f"{__name__}:LEAKY")
    monkeypatch.setitem(registry.HEADS, "broken", f"{__name__}:BROKEN")
    result = CliRunner().invoke(main, ["check-head", "leaky", "broken"])
    assert result.exit_code == 1, result.output
    assert "FAIL  sizes" in result.output and "FAIL  chunks" in result.output
    assert "leaky: sizes; leaky: chunks; broken: runs" in result.output  # the closing line names what failed
    assert "RuntimeError: scores of the wrong shape" in result.output and "Traceback" not in result.output
    unknown = CliRunner().invoke(main, ["check-head", "nonesuch"])
    assert unknown.exit_code == 2 and "registered: " in unknown.output


@pytest.mark.parametrize("name", head_names())
def test_every_registered_head_trains_evaluates_and_reloads(name, request, tmp_path):
    tokens = head_spec(name).features != {"frames"}  # token-level heads get the tokens they declare
    tiny_features = request.getfixturevalue("tiny_token_features" if tokens else "tiny_features")
    run = tmp_path / name
    runner = CliRunner()
    trained = runner.invoke(main, ["train", "--features", str(tiny_features), "--head", name, "--epochs", "1",
                                   "--lr", "1e-3", "--val-fraction", "0", "--eval-trials", "2", "--no-progress",
                                   "--device", "cpu", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in log if "total" in r]
    assert len(losses) == 1024 // 32 and all(math.isfinite(x) for x in losses)
    head, checkpoint = load_checkpoint(run / "best.pt")  # rebuilt through the registry
    torch.manual_seed(0)  # the trainer builds the head under its seed
    initial = head_spec(name).build(head.cfg)
    assert type(head) is type(initial) and checkpoint["head_config"]["head"] == name
    assert any(not torch.equal(a, b) for a, b in zip(head.state_dict().values(), initial.state_dict().values()))
    evaluated = runner.invoke(main, ["eval", "--features", str(tiny_features), "--checkpoint", str(run / "best.pt"),
                                     "--trials", "2", "--json", str(run / "eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((run / "eval.json").read_text())["head"] == name
    reported = runner.invoke(main, ["report", str(run), "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    assert f"| {display_name(name)} |" in (tmp_path / "report" / "comparison.md").read_text()


def test_every_reader_names_every_head():
    from tmass.sweep import heads_sweep

    runner = CliRunner()
    train_help = runner.invoke(main, ["train", "--help"]).output
    ablate_help = runner.invoke(main, ["ablate", "--help"]).output
    sweep = heads_sweep()
    assert [v.name for v in sweep.variants] == [display_name(n) for n in head_names()]
    for name in head_names():
        assert name in train_help and name in ablate_help
    # the heads sweep trains the paper's X-Pool and final T-MASS configurations: it shares their runs
    from tmass.sweep import SWEEPS

    keys = {v.name: v.run_key() for v in SWEEPS["radius"].variants}
    by_display = {v.name: v.run_key() for v in sweep.variants}
    assert by_display["X-Pool"] == keys["w/o R (X-Pool)"] and by_display["T-MASS"] == keys["R = W S + b (linear)"]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("name", [n for n in head_names() if "folded-xpool" in head_spec(n).fast_paths])
def test_training_fast_path_equals_the_heads_own_pooling(name, dropout):
    """The folded X-Pool pooling that training uses gives the losses and gradients of the
    head's own module, with dropout off, and on (the module given the folded path's mask)."""
    from tmass.train.data import Batch
    from tmass.train.folded import dropout_mask
    from tmass.train.losses import batch_losses, build_loss

    spec = head_spec(name)
    torch.manual_seed(0)
    head = spec.build(spec.make_config(embed_dim=16, num_frames=4, dropout=dropout))
    with torch.no_grad():  # away from the identity init, so that every folded term matters
        for param in head.parameters():
            param.add_(0.1 * torch.randn_like(param))
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(6)
    batch = Batch(rows, rows, [f"t{i}" for i in range(6)], torch.randn(6, 16, generator=g) * 4,
                  torch.randn(6, 4, 16, generator=g) * 4, torch.ones(6, 4, dtype=torch.bool))
    results = []
    for path in ("folded", "module"):
        head.zero_grad()
        torch.manual_seed(1)
        kept = dropout_mask(head.pooling.dropout, (6, 6, 16))
        if path == "module" and kept is not None:
            head.pooling.dropout.forward = lambda x: x * kept / (1 - dropout)
        torch.manual_seed(1)
        losses = batch_losses(head, batch, build_loss("infonce"), spec.loss_terms,
                              generator=torch.Generator().manual_seed(0), pooling_path=path)
        vars(head.pooling.dropout).pop("forward", None)
        losses["total"].backward()
        results.append((losses["total"].detach(), torch.cat([p.grad.flatten() for p in head.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)
