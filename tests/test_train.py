"""Training: loss, schedule, loss-term selection, folded pooling, hold-out, trainer, CLI.

Runs on the simulated ``tiny`` features; the whole file is meant to take well under
a minute and a half on two CPU cores."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tmass.cli import main
from tmass.evaluate import split_metrics
from tmass.features.format import load_split
from tmass.train.data import Batch, PairData, epoch_order, held_out_videos, split_validation, subset_videos
from tmass.train.folded import dropout_mask, folded_xpool
from tmass.train.heads import LOGIT_SCALE_MAX, Head, HeadConfig, XPoolFusion
from tmass.train.losses import batch_losses, build_loss, parse_loss_terms, support_videos
from tmass.train.losses.infonce import symmetric_infonce
from tmass.train.config import build_config, read_config_file
from tmass.train.trainer import (TrainConfig, Trainer, load_checkpoint, lr_at, resolve_configs, steps_in_words,
                                 train)

FAST = dict(lr=1e-3, val_fraction=0.0, final_eval=False)  # tiny runs: no validation, no test metrics


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from a second thread, and two spinning threads on a
    shared 2-core machine can make a step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- loss


def test_infonce_known_value():
    # identity sims at scale 1: every row and column is softmax([1, 0]) at the target
    logits = torch.eye(2)
    assert symmetric_infonce(logits).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # hand-computed asymmetric case: rows (t2v) and columns (v2t) differ
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    t2v = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    v2t = (-math.log(math.exp(2) / (math.exp(2) + math.e)) - math.log(math.e / (1 + math.e))) / 2
    assert symmetric_infonce(logits).item() == pytest.approx((t2v + v2t) / 2, rel=1e-6)


def test_infonce_is_symmetric_in_texts_and_videos():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    assert symmetric_infonce(logits).item() == pytest.approx(symmetric_infonce(logits.T).item(), rel=1e-6)


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_peak_and_end():
    total, base = 1000, 1e-5
    assert lr_at(0, total, base) == 0.0
    assert lr_at(50, total, base) == pytest.approx(base / 2)  # half-way through the 100 warm-up steps
    assert lr_at(100, total, base) == pytest.approx(base)  # peak at the end of warm-up
    assert lr_at(550, total, base) == pytest.approx(base / 2)  # cosine half-way
    assert lr_at(999, total, base) < 1e-3 * base and lr_at(total, total, base) == 0.0
    lrs = [lr_at(s, total, base) for s in range(total)]
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101])) and all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lr_at(0, 10, base, warmup_fraction=0.0) == base  # no warm-up: start at the peak


# ----------------------------------------------------------------------------- loss terms


def test_loss_terms_defaults_and_errors():
    assert parse_loss_terms(None, "meanp") == ("ce",)
    assert parse_loss_terms("", "xpool") == ("ce",)
    assert parse_loss_terms("", "tmass") == ("s", "sup")
    assert parse_loss_terms("sup,s,ce", "tmass") == ("ce", "s", "sup")  # canonical order
    for terms in ("s", "ce,sup"):
        with pytest.raises(ValueError, match="need the T-MASS radius"):
            parse_loss_terms(terms, "xpool")
    with pytest.raises(ValueError, match="unknown loss terms"):
        parse_loss_terms("ce,kl", "tmass")


def _batch(n=6, dim=16, frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[1, 2:] = False  # one short clip
    return torch.randn(n, dim, generator=g) * 8, torch.randn(n, frames, dim, generator=g) * 10, mask


def _pairs(text, frames, mask) -> Batch:
    """A batch of pairs with distinct videos."""
    rows = torch.arange(len(text))
    return Batch(rows, rows, [f"t{i}" for i in range(len(text))], text, frames, mask)


INFONCE = build_loss("infonce")


def test_batch_losses_terms_and_total():
    text, frames, mask = _batch()
    head = Head(HeadConfig(head="tmass", embed_dim=16, num_frames=4, dropout=0.0)).eval()
    batch = _pairs(text, frames, mask)
    losses = batch_losses(head, batch, INFONCE, ("ce", "s", "sup"), support_weight=0.8,
                          generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"ce", "s", "sup", "total"}
    assert losses["total"].item() == pytest.approx((losses["ce"] + losses["s"] + 0.8 * losses["sup"]).item())
    # ce is X-Pool's loss: the same for a T-MASS head and an X-Pool head with the same weights
    xpool = Head(HeadConfig(head="xpool", embed_dim=16, num_frames=4, dropout=0.0)).eval()
    assert batch_losses(xpool, batch, INFONCE, ("ce",))["ce"].item() == pytest.approx(losses["ce"].item(), rel=1e-5)
    # the stochastic term follows its generator; the support term is deterministic
    again = batch_losses(head, batch, INFONCE, ("s", "sup"), generator=torch.Generator().manual_seed(0))
    other = batch_losses(head, batch, INFONCE, ("s", "sup"), generator=torch.Generator().manual_seed(1))
    assert again["s"].item() == pytest.approx(losses["s"].item()) and other["s"].item() != again["s"].item()
    assert other["sup"].item() == pytest.approx(losses["sup"].item())
    with pytest.raises(ValueError, match="T-MASS"):
        batch_losses(xpool, batch, INFONCE, ("s",))


@pytest.mark.parametrize("radius", ["sim", "scalar", "linear"])
@pytest.mark.parametrize("prior", ["uniform", "normal"])
def test_every_radius_and_prior_trains(radius, prior):
    """Table 5's radii and both priors: the loss back-propagates into the radius when it
    has parameters (sim has none), and the prior sets the noise of t_s."""
    text, frames, mask = _batch()
    head = Head(HeadConfig(head="tmass", embed_dim=16, num_frames=4, radius=radius, prior=prior, prior_std=3e-3))
    losses = batch_losses(head, _pairs(text, frames, mask), INFONCE, ("s", "sup"), generator=torch.Generator().manual_seed(0))
    losses["total"].backward()
    radius_grads = [p.grad for p in head.radius.parameters()]
    assert len(radius_grads) == {"sim": 0, "scalar": 1, "linear": 2}[radius]
    assert all(g is not None and g.abs().sum() > 0 for g in radius_grads)
    noise = head.sample_noise((2000, 16), torch.Generator().manual_seed(0))
    if prior == "uniform":
        assert noise.min() >= 0 and noise.max() < 1
    else:
        assert noise.std().item() == pytest.approx(3e-3, rel=0.05)


def test_support_video_paired_depends_on_the_pair_only():
    """paired: pair 0's support video is the same whatever else is in the batch;
    batch-mean (the reference) changes with the other captions."""
    text, frames, mask = _batch()
    head = Head(HeadConfig(head="tmass", embed_dim=16, num_frames=4, dropout=0.0)).eval()

    def first_pair(kind, rows):
        return support_videos(head.pool(text[rows], frames[rows], mask[rows]), kind)[0]

    pooled = head.pool(text, frames, mask)
    assert torch.equal(support_videos(pooled, "paired")[2], pooled[2, 2])
    assert torch.allclose(support_videos(pooled, "batch-mean")[2], pooled[:, 2].mean(0))
    assert torch.allclose(first_pair("paired", [0, 1, 2, 3]), first_pair("paired", [0, 4, 5]), atol=1e-5)
    assert not torch.allclose(first_pair("batch-mean", [0, 1, 2, 3]), first_pair("batch-mean", [0, 4, 5]), atol=1e-3)


# ----------------------------------------------------------------------------- folded pooling


@pytest.mark.parametrize("num_heads", [1, 2])
def test_folded_xpool_equals_the_module(num_heads):
    """Same values and gradients as XPoolFusion.forward, in eval mode, and in train mode
    with dropout off and with dropout on (the module given the folded path's mask), with
    a padded clip."""
    torch.manual_seed(0)
    fusion = XPoolFusion(HeadConfig(head="xpool", embed_dim=16, num_frames=4, num_heads=num_heads))
    with torch.no_grad():  # leave the identity init so every term matters
        for p in fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    text, frames, mask = _batch()
    for mode, rate in (("eval", 0.3), ("train", 0.0), ("train", 0.3)):
        getattr(fusion, mode)()
        fusion.dropout.p = rate
        outputs, grads = [], []
        for path in ("module", "folded"):
            fusion.zero_grad()
            torch.manual_seed(1)
            if path == "module":
                kept = dropout_mask(fusion.dropout, (len(text), len(frames), 16))
                if kept is not None:  # the module's own dropout, with the mask the folded path draws
                    fusion.dropout.forward = lambda x, kept=kept: x * kept / (1 - rate)
                out = fusion(text, frames, mask)
                vars(fusion.dropout).pop("forward", None)
            else:
                out = folded_xpool(fusion, text, frames, mask)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outputs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in fusion.parameters()]))
        assert torch.allclose(outputs[0], outputs[1], atol=1e-5), (mode, rate)
        assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4), (mode, rate)


def test_dropout_mask_has_the_distribution_of_nn_dropout():
    dropout = torch.nn.Dropout(0.3)
    torch.manual_seed(0)
    kept = dropout_mask(dropout, (400, 1000))
    assert kept.dtype == torch.float32 and set(kept.unique().tolist()) == {0.0, 1.0}
    assert kept.mean().item() == pytest.approx(0.7, abs=0.005)
    torch.manual_seed(0)  # draws from torch's global generator: int32 draws below 0.7 * 2**31 are kept
    assert torch.equal((torch.empty(400, 1000, dtype=torch.int32).random_() < round(0.7 * 2**31)).float(), kept)
    assert dropout_mask(dropout.eval(), (400, 1000)) is None


# ----------------------------------------------------------------------------- data


def test_validation_holdout_is_by_video_and_deterministic(tiny_features):
    arrays = load_split(tiny_features / "train")
    held = held_out_videos(arrays.video_ids, 0.2)
    assert 0.1 < held.mean() < 0.3
    assert np.array_equal(held, held_out_videos(list(arrays.video_ids), 0.2))
    # a video's side depends on its id alone, not on the order or the other ids
    assert np.array_equal(held_out_videos(arrays.video_ids[::-1], 0.2), held[::-1])
    fit, val = split_validation(arrays, 0.2)
    assert set(fit.video_ids).isdisjoint(val.video_ids)
    assert len(fit.video_ids) + len(val.video_ids) == len(arrays.video_ids)
    assert len(fit.text_ids) + len(val.text_ids) == len(arrays.text_ids)
    for part in (fit, val):  # every caption still points at its own video's frames
        original = {v: i for i, v in enumerate(arrays.video_ids)}
        for t in range(0, len(part.text_ids), 7):
            source_row = original[part.video_ids[part.text_to_video[t]]]
            assert np.array_equal(part.frames[part.text_to_video[t]], arrays.frames[source_row])
            assert part.text_ids[t].startswith(part.video_ids[part.text_to_video[t]])
    assert split_validation(arrays, 0.0) == (arrays, None)
    assert subset_videos(arrays, np.ones(len(arrays.video_ids), bool)).text_ids == arrays.text_ids


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(100, seed=0, epoch=3)
    assert torch.equal(a, epoch_order(100, seed=0, epoch=3))
    assert torch.equal(a.sort().values, torch.arange(100))
    assert not torch.equal(a, epoch_order(100, seed=0, epoch=4))
    assert not torch.equal(a, epoch_order(100, seed=1, epoch=3))


# ----------------------------------------------------------------------------- trainer


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["total"] for r in records if "total" in r]


def test_training_reduces_loss_and_beats_the_untrained_model(tiny_features, tmp_path):
    cfg = TrainConfig(epochs=3, lr=1e-3, val_fraction=0.0, eval_trials=5, device="cpu")
    untrained = train(tiny_features, tmp_path / "untrained", dataclasses.replace(cfg, epochs=0),
                      HeadConfig(head="tmass"), progress=False, evaluate=split_metrics)
    trained = train(tiny_features, tmp_path / "trained", cfg, HeadConfig(head="tmass"), progress=False,
                    evaluate=split_metrics)
    losses = _losses(tmp_path / "trained")
    assert len(losses) == 3 * (1024 // 32)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert trained["test"]["t2v"]["R1"] > untrained["test"]["t2v"]["R1"] + 5
    assert trained["test"]["trials"] == 5


def test_logit_scale_learns_and_is_capped_after_every_step(tiny_features):
    """As in the reference: the scale starts at the manifest's 100, moves when the loss
    asks it to, and is clamped at 100 after each optimiser step."""
    arrays = load_split(tiny_features / "train")
    # texts equal to their video's mean frame: the loss asks for a sharper softmax
    aligned = dataclasses.replace(arrays, text_embeddings=arrays.frames.astype(np.float32).mean(1)[arrays.text_to_video])
    cpu = torch.device("cpu")

    def scales(data, init):
        cfg, head_cfg = resolve_configs(TrainConfig(**{**FAST, "lr": 1e-2, "warmup_fraction": 0.0}), HeadConfig(head="meanp"), data)
        trainer = Trainer(cfg, dataclasses.replace(head_cfg, logit_scale=init), PairData(data, cpu), cpu)
        return [trainer.step(rows)["logit_scale"] for rows in itertools.islice(trainer.epoch_batches(0), 5)]

    softer = scales(arrays, 100.0)  # the tiny features at init: the loss asks for a softer softmax
    assert all(a > b for a, b in zip([100.0] + softer, softer))
    sharper = scales(aligned, 20.0)
    assert all(a < b for a, b in zip([20.0] + sharper, sharper))
    assert all(s <= LOGIT_SCALE_MAX * (1 + 1e-6) for s in scales(aligned, 100.0))  # pushed up, held at the cap


def _tmass_trainer(tiny_features, device, **cfg):
    arrays = load_split(tiny_features / "train")
    dev = torch.device(device)
    config, head_cfg = resolve_configs(TrainConfig(**{**FAST, **cfg}), HeadConfig(head="tmass"), arrays)
    return Trainer(config, head_cfg, PairData(arrays, dev), dev)


def test_bf16_autocast_trains_with_finite_losses(tiny_features, device):
    """--amp bf16: the forward pass runs in bfloat16 (on this device), losses stay finite
    and the weights move; amp is part of a run's identity, compile is not."""
    trainer = _tmass_trainer(tiny_features, device, amp="bf16")
    before = [p.detach().clone() for p in trainer.head.parameters()]
    records = [trainer.step(rows) for rows in itertools.islice(trainer.epoch_batches(0), 3)]
    assert all({"total", "s", "sup", "logit_scale"} <= set(r) and all(map(math.isfinite, r.values())) for r in records)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.head.parameters()))
    assert "amp" in trainer.cfg.identity() and "compile" not in trainer.cfg.identity()
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16):  # what the step runs under
        assert trainer.head.pooling.q_proj(torch.ones(2, trainer.head.cfg.embed_dim, device=device)).dtype == torch.bfloat16


def test_a_step_reads_nothing_back_but_its_record(tiny_features, device, monkeypatch):
    """Features and the epoch's order live on the device; a step gathers its batch there
    and reads one thing back to the host: its log record, as one tensor."""
    trainer = _tmass_trainer(tiny_features, device)
    batches = trainer.epoch_batches(0)
    rows = next(batches)
    assert rows.device == trainer.data.device == trainer.data.frames.device == torch.device(device)
    trainer.step(rows)  # warm-up: first-call work may read back
    # AdamW keeps its step counters on the host (torch reads them there, never the device)
    counters = {id(state["step"]) for state in trainer.optimizer.state.values()}
    reads = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            if id(self) not in counters:
                reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    record = trainer.step(next(batches))
    monkeypatch.undo()
    assert reads == ["tolist"] and record["step"] == 2 and math.isfinite(record["total"])


def test_epochs_zero_writes_the_initial_model(tiny_features, tmp_path):
    metrics = train(tiny_features, tmp_path / "run", TrainConfig(epochs=0, **FAST), HeadConfig(head="xpool"), progress=False)
    assert metrics["steps"] == 0
    head, checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["step"] == 0 and (tmp_path / "run" / "last.pt").exists()
    fresh = Head(dataclasses.replace(head.cfg))
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), fresh.state_dict().values()))
    assert head.logit_scale().item() == pytest.approx(100.0)  # from the features manifest
    groups = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.2, len(head.state_dict()) - 1), (0.0, 1)]


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_features, tmp_path):
    cfg = TrainConfig(epochs=2, checkpoint_every=5, **FAST)
    head_cfg = HeadConfig(head="tmass")
    train(tiny_features, tmp_path / "straight", cfg, head_cfg, progress=False)
    # interrupted mid-epoch 1 (step 43, checkpoint every 5: last.pt written at the stop)
    assert train(tiny_features, tmp_path / "resumed", cfg, head_cfg, progress=False, stop_after=43) == {"stopped_at": 43}
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")[1]["step"] == 43
    train(tiny_features, tmp_path / "resumed", cfg, head_cfg, progress=False, resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 64
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert (tmp_path / "straight" / "log.jsonl").read_text() == (tmp_path / "resumed" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="lr"):  # a different run cannot resume this one
        train(tiny_features, tmp_path / "resumed", dataclasses.replace(cfg, lr=1e-4), head_cfg, progress=False, resume=True)
    with pytest.raises(FileExistsError):
        train(tiny_features, tmp_path / "resumed", cfg, head_cfg, progress=False)


def test_validation_selects_best_and_labels_it(tiny_features, tmp_path):
    cfg = TrainConfig(epochs=2, lr=1e-3, val_fraction=0.2, val_every=10, final_eval=False)
    with pytest.raises(ValueError, match="need an evaluator"):  # train/ cannot pick one: it is handed in
        train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="xpool"), progress=False)
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="xpool"), progress=False, evaluate=split_metrics)
    assert torch.get_num_threads() == 1  # the evaluator's numba pool must not reset torch's threads
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    per_epoch = config["pairs"]["train"] // 32
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r.get("event") == "val"]
    expected = sorted(set(range(10, 2 * per_epoch + 1, 10)) | {per_epoch, 2 * per_epoch})
    assert [r["step"] for r in vals] == expected and all(r["split"] == "val" for r in vals)
    best = max(vals, key=lambda r: r["t2v"]["R1"])  # first of the ties wins
    _, checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["step"] == best["step"] and checkpoint["best"]["R1"] == best["t2v"]["R1"]
    assert config["pairs"]["val"] > 0 and config["selection"].startswith("validation")


# ----------------------------------------------------------------------------- step budget (max_steps)


BUDGET = TrainConfig(epochs=2, max_steps=40, checkpoint_every=5, **FAST)  # 1.25 of tiny's 2 epochs of 32 steps


@pytest.fixture(scope="module")
def budget_runs(tiny_features, tmp_path_factory):
    """X-Pool runs of BUDGET (40 steps), of its 2 whole epochs (64 steps) and of a budget
    of 64 steps under 3 epochs: {name: (run directory, caption rows of every step)}."""
    root = tmp_path_factory.mktemp("budget")
    runs, original = {}, Trainer.step
    for name, cfg in (("steps40", BUDGET), ("epochs2", dataclasses.replace(BUDGET, max_steps=0)),
                      ("steps64", dataclasses.replace(BUDGET, epochs=3, max_steps=64))):
        rows = []

        def step(self, batch, rows=rows):
            rows.append(batch.tolist())
            return original(self, batch)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "step", step)
            train(tiny_features, root / name, cfg, HeadConfig(head="xpool"), progress=False)
        runs[name] = (root / name, rows)
    return runs


def test_max_steps_trains_the_first_steps_of_the_epochs_run(budget_runs):
    """The same pairs in the same batches: 40 steps are the 2-epoch run's first 40
    (into its second epoch), and a budget of the epochs' own 64 steps is that run, weight
    for weight, however many epochs it allows."""
    (short, short_rows), (full, full_rows), (same, same_rows) = (budget_runs[k] for k in ("steps40", "epochs2", "steps64"))
    assert len(short_rows) == 40 and short_rows == full_rows[:40] and same_rows == full_rows
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (full, same))
    assert a["step"] == b["step"] == 64
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    assert load_checkpoint(short / "last.pt")[1]["step"] == 40


def test_max_steps_schedule_spans_the_budget_and_the_run_says_so(budget_runs):
    run = budget_runs["steps40"][0]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "total" in r]
    assert lrs == [lr_at(step, 40, BUDGET.lr, BUDGET.warmup_fraction) for step in range(40)]
    assert max(lrs) == lrs[4] == BUDGET.lr and lrs[-1] < 0.01 * BUDGET.lr  # warm-up 10 % of 40, cosine ends at 40
    assert records[0]["total_steps"] == 40
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 40
    rerun = build_config(TrainConfig, read_config_file(run / "config.json")["train"], "train")  # --config re-runs it
    assert (rerun.epochs, rerun.max_steps, rerun.checkpoint_every) == (BUDGET.epochs, 40, BUDGET.checkpoint_every)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trained"] == "trained 40 steps (1.25 epochs)" and metrics["steps"] == 40 and metrics["epochs"] == 1.25
    log = (run / "train.log").read_text()
    assert "epoch 2: mean loss" in log and "over 8 steps (the run ends 24 steps before the epoch's end)" in log
    assert "epoch 3" not in log


def test_steps_in_words():
    assert steps_in_words(1000, 5625) == "1,000 steps (0.18 epoch)"
    assert steps_in_words(64, 32) == "64 steps (2 epochs)" and steps_in_words(32, 32) == "32 steps (1 epoch)"
    assert steps_in_words(1, 5625) == "1 step (0.0002 epoch)" and steps_in_words(0, 32) == "0 steps (0 epochs)"


def test_a_resumed_max_steps_run_ends_where_the_uninterrupted_one_does(tiny_features, budget_runs, tmp_path):
    straight, out = budget_runs["steps40"][0], tmp_path / "resumed"
    assert train(tiny_features, out, BUDGET, HeadConfig(head="xpool"), progress=False, stop_after=35) == {"stopped_at": 35}
    assert train(tiny_features, out, BUDGET, HeadConfig(head="xpool"), progress=False, resume=True)["steps"] == 40
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (straight, out))
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    assert (straight / "log.jsonl").read_text() == (out / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="max_steps: checkpoint 40, now 50"):
        train(tiny_features, out, dataclasses.replace(BUDGET, max_steps=50), HeadConfig(head="xpool"), progress=False,
              resume=True)


def test_a_run_shorter_than_an_epoch_selects_best_pt_on_validation_up_to_its_last_step(tiny_features, tmp_path):
    from tmass.evaluate.figures import training_curves_figure

    run = tmp_path / "run"
    cfg = TrainConfig(epochs=1, max_steps=10, val_every=4, lr=1e-3, val_fraction=0.2, final_eval=False)
    metrics = train(tiny_features, run, cfg, HeadConfig(head="xpool"), progress=False, evaluate=split_metrics)
    per_epoch = json.loads((run / "config.json").read_text())["pairs"]["train"] // 32
    assert per_epoch > 10
    vals = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [4, 8, 10]
    best = max(vals, key=lambda r: r["t2v"]["R1"])  # first of the ties wins
    _, checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["step"] == metrics["best"]["step"] == best["step"]
    assert metrics["trained"] == f"trained 10 steps ({round(10 / per_epoch, 2):g} epoch)"
    assert metrics["chosen"].startswith(f"best.pt is the state after {best['step']} steps (")
    curves = training_curves_figure(run)  # a partial epoch: validation drawn up to the last step
    assert list(curves.axes[1].get_lines()[0].get_xdata()) == [4, 8, 10]
    assert metrics["trained"] in curves._suptitle.get_text()


# ----------------------------------------------------------------------------- CLI


def test_cli_help():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0 and "--support-weight" in result.output and "--resume" in result.output


def test_cli_writes_the_run_directory_and_resumes(tiny_features, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--features", str(tiny_features), "--out", str(out), "--head", "xpool", "--epochs", "2",
            "--lr", "1e-3", "--seed", "3", "--eval-trials", "0", "--no-progress"]
    result = CliRunner().invoke(main, args + ["--stop-after", "20"])
    assert result.exit_code == 0, result.output
    assert not (out / "metrics.json").exists()
    # resume takes the run's settings; a conflicting one is refused
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "--seed", "4"])
    assert result.exit_code != 0 and "--seed 4" in result.output
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "test t2v R@1" in result.output
    for name in ("config.json", "log.jsonl", "train.log", "last.pt", "best.pt", "metrics.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["train"]["loss_terms"] == ["ce"]
    assert config["head"]["head"] == "xpool" and config["head"]["embed_dim"] == 64
    assert config["features_manifest_sha256"]["train"] == load_split(tiny_features / "train").manifest_sha256
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_epoch = config["pairs"]["train"] // 32  # 5 % of the videos held out for validation
    assert [r["step"] for r in steps if "total" in r] == list(range(1, 2 * per_epoch + 1))
    assert {"lr", "ce", "total", "logit_scale"} <= set(steps[1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["t2v"]["n"] == 128 and metrics["selection"].startswith("validation")


def test_cli_rejects_stochastic_terms_for_a_deterministic_head(tiny_features, tmp_path):
    result = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(tmp_path / "r"),
                                       "--head", "xpool", "--loss-terms", "s,sup"])
    assert result.exit_code != 0 and "need the T-MASS radius" in result.output


def test_cli_select_on_test_is_labelled_everywhere(tiny_features, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(out), "--head", "meanp",
                                       "--epochs", "1", "--select-on", "test", "--no-progress"])
    assert result.exit_code == 0, result.output
    label = "test-split (optimistic)"
    assert json.loads((out / "config.json").read_text())["selection"] == label
    assert json.loads((out / "metrics.json").read_text())["selection"] == label
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["selection"] == label
    assert [r["split"] for r in records if r.get("event") == "val"] == ["test"]
    assert all(r["selection"] == label for r in records if r.get("event") == "val")
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(out / name)[1]["selection"] == label
    assert label in result.output


# ----------------------------------------------------------------------------- runs and the features they use


@pytest.fixture
def mixed_features(tiny_features, tmp_path):
    """tiny's train split with the test split of another simulated world (seed 1): same
    width and frame count, other features."""
    import shutil

    from tmass.features.simulate import simulate

    other = tmp_path / "other"
    simulate("tiny", other, seed=1, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_features / "train", mixed / "train")
    shutil.copytree(other / "test", mixed / "test")
    return mixed


def test_train_refuses_splits_that_do_not_belong_together_before_the_first_step(mixed_features, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--features", str(mixed_features), "--out", str(out), "--head", "xpool",
                                       "--epochs", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message and "does not belong" in message and "seed 1 vs 0" in message, message
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


def test_eval_refuses_a_checkpoint_trained_on_other_features(tiny_features, mixed_features, tmp_path):
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(run), "--head", "xpool",
                                        "--epochs", "0", "--no-final-eval"])
    assert trained.exit_code == 0, trained.output
    assert torch.load(run / "best.pt", weights_only=False)["features_identity"]["seed"] == 0
    result = CliRunner().invoke(main, ["eval", "--features", str(mixed_features), "--checkpoint", str(run / "best.pt"),
                                       "--trials", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message and "trained on other features" in message and "seed 1 vs 0" in message, message


# features_identity of tiny's splits as runs recorded it before the identity moved to features/format.py
RECORDED_IDENTITY = {"source": "simulated", "model": "simulated", "pretrained": "none", "checkpoint_sha256": None,
                     "random_init": False, "embed_dim": 64, "num_frames": 12, "image_size": None, "weights": "none",
                     "format_version": "1", "seed": 0, "preset": "tiny"}


def test_the_features_identity_is_the_encoder_part_of_the_provenance(tiny_features):
    from tmass.features.format import IDENTITY_KEYS, FeatureMeta, features_identity, provenance

    manifest = json.loads((tiny_features / "train" / "manifest.json").read_text())
    identity = features_identity(tiny_features / "train")
    assert identity == features_identity(manifest) == RECORDED_IDENTITY
    made = provenance(FeatureMeta.from_json(manifest["meta"]))
    assert {key: identity[key] for key in IDENTITY_KEYS} == {key: made[key] for key in IDENTITY_KEYS}
    # what does not move the embedding space is not part of it: the dataset's name, the frame sampling
    renamed = {**manifest, "meta": {**manifest["meta"], "dataset": "other", "frame_sampling": "other"}}
    assert features_identity(renamed) == identity
    reseeded = {**manifest, "meta": {**manifest["meta"], "extra": {**manifest["meta"]["extra"], "seed": 1}}}
    assert features_identity(reseeded) == {**identity, "seed": 1}


def test_a_run_recorded_before_the_identity_moved_still_evaluates(tiny_features, mixed_features, tmp_path):
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(run), "--head", "xpool",
                                        "--epochs", "0", "--no-final-eval", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    checkpoint = torch.load(run / "best.pt", weights_only=False)
    checkpoint["features_identity"] = dict(RECORDED_IDENTITY)  # as the old code wrote it
    torch.save(checkpoint, run / "best.pt")
    config = json.loads((run / "config.json").read_text())
    assert config["features_identity"] == RECORDED_IDENTITY
    result = CliRunner().invoke(main, ["eval", "--features", str(tiny_features), "--checkpoint", str(run / "best.pt"),
                                       "--trials", "0"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["eval", "--features", str(mixed_features), "--checkpoint", str(run / "best.pt"),
                                       "--trials", "0"])
    message = result.output.strip()
    assert result.exit_code == 1 and "\n" not in message and "trained on other features" in message
    assert "seed 1 vs 0" in message, message


def test_resume_names_every_difference_on_one_line(tiny_features, tmp_path):
    cfg = TrainConfig(epochs=2, **FAST)
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="xpool"), progress=False, stop_after=3)
    changed = dataclasses.replace(cfg, lr=1e-4, seed=5)
    with pytest.raises(ValueError) as error:
        train(tiny_features, tmp_path / "run", changed, HeadConfig(head="xpool"), progress=False, resume=True)
    message = str(error.value)
    assert "\n" not in message and "lr: checkpoint 0.001, now 0.0001" in message and "seed: checkpoint 0, now 5" in message


def test_two_resumes_of_one_run_cannot_both_go_ahead_and_a_killed_one_blocks_nothing(tiny_features, tmp_path):
    """The second process is refused at once with one line and writes nothing; the lock
    dies with its holder, kill -9 included."""
    import signal
    import subprocess
    import sys
    import time

    from tmass.train.runs import lock_run

    out = tmp_path / "run"
    train(tiny_features, out, TrainConfig(epochs=500, **FAST), HeadConfig(head="xpool"), progress=False, stop_after=1)
    holder = subprocess.Popen([sys.executable, "-c", "from tmass.cli import main; main()", "train", "--resume",
                               "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "resumed at step 1" not in (out / "train.log").read_text():  # written once it holds the run
            assert holder.poll() is None and time.monotonic() < deadline, "the first resume did not start"
            time.sleep(0.2)
        log = (out / "log.jsonl").read_text()
        second = CliRunner().invoke(main, ["train", "--resume", "--out", str(out)])
        assert second.exit_code == 1 and "Traceback" not in second.output
        message = second.output.strip()
        assert "\n" not in message and "another process is working in this run" in message, message
        assert holder.poll() is None  # the first one goes on
        assert (out / "log.jsonl").read_text().startswith(log)  # and is the only writer
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run(out).close()  # free at once after kill -9

