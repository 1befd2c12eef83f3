"""The loss registry and its built-in losses: hand-computed cases, gradients, the batch's
positives (several captions of one video), plugins by entry point, any loss in a run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from tmass.features.format import load_split
from tmass.train import losses as registry
from tmass.train.config import setting
from tmass.train.data import Batch, PairData
from tmass.train.heads import HeadConfig
from tmass.train.losses import Loss, Scores, build_loss, loss_class, loss_names
from tmass.train.losses.infonce import InfoNCE, symmetric_infonce
from tmass.train.losses.triplet import TripletHN, max_violation_triplet
from tmass.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(video_rows, dim=4) -> Batch:
    n = len(video_rows)
    return Batch(torch.arange(n), torch.tensor(video_rows), [f"t{i}" for i in range(n)], torch.zeros(n, dim),
                 torch.zeros(n, 2, dim), torch.ones(n, 2, dtype=torch.bool))


COS = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.6, 0.65], [0.3, 0.0, 0.8]])


def test_registry_lists_and_builds_the_built_in_losses():
    assert loss_names()[:2] == ("infonce", "triplet-hn")
    assert loss_class("triplet-hn") is TripletHN and build_loss("triplet-hn", {"margin": 0.1}).cfg.margin == 0.1
    assert build_loss("infonce").cfg.same_video == "negative"  # the default keeps the paper's loss
    with pytest.raises(ValueError, match="unknown loss 'ndcg'; choose from infonce, triplet-hn"):
        build_loss("ndcg")
    with pytest.raises(ValueError, match="loss triplet-hn: unknown setting 'margn'"):
        build_loss("triplet-hn", {"margn": 0.1})
    # one wording from the field's bounds, whether built from values or directly
    with pytest.raises(ValueError, match=r"^loss triplet-hn\.margin: -1\.0 is not in \[0, inf\)$"):
        build_loss("triplet-hn", {"margin": -1.0})
    with pytest.raises(ValueError, match=r"^margin: -1\.0 is not in \[0, inf\)$"):
        TripletHN.Config(margin=-1.0)


def test_triplet_hn_hand_computed():
    """margin 0.2. Distinct videos: text 1's hardest negative is video 2 (0.2 + 0.65 - 0.6
    = 0.25); videos 1 and 2 have hinges 0.1 and 0.05, the rest are inside the margin."""
    loss = TripletHN(TripletHN.Config(margin=0.2))
    parts = loss(_batch([0, 1, 2]), Scores(cos=COS, logits=COS * 100))
    assert parts["t2v"].item() == pytest.approx(0.25 / 3)
    assert parts["v2t"].item() == pytest.approx(0.15 / 3)
    assert parts["total"].item() == pytest.approx(0.25 / 3 + 0.15 / 3)
    # captions 1 and 2 describe one video: each is a positive of the other's column, never
    # a negative. Text 1's only negative is then video 0 (no hinge), video 1's is text 0.
    parts = loss(_batch([0, 5, 5]), Scores(cos=COS, logits=COS * 100))
    assert parts["t2v"].item() == 0.0
    assert parts["v2t"].item() == pytest.approx(0.1 / 3)
    # a batch of one video has no negatives at all: zero loss, zero (not NaN) gradients
    cos = COS.clone().requires_grad_()
    loss(_batch([7, 7, 7]), Scores(cos=cos, logits=cos))["total"].backward()
    assert torch.equal(cos.grad, torch.zeros_like(cos))


def test_triplet_hn_gradcheck():
    cos = (torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).requires_grad_()
    positives = _batch([0, 1, 1, 2, 3]).positives
    assert torch.autograd.gradcheck(lambda c: sum(max_violation_triplet(c, positives, 0.3)), (cos,))


def test_infonce_default_keeps_diagonal_targets_and_excluded_drops_same_video_columns():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 5
    scores = Scores(cos=logits / 100, logits=logits)
    same = _batch([0, 1, 1, 2])  # captions 1 and 2 share a video
    assert torch.equal(InfoNCE()(same, scores)["total"], symmetric_infonce(logits))
    excluded = InfoNCE(InfoNCE.Config(same_video="excluded"))
    # distinct videos: nothing to exclude, the same loss
    assert torch.equal(excluded(_batch([0, 1, 2, 3]), scores)["total"], symmetric_infonce(logits))
    # by hand: entries (1, 2) and (2, 1) leave both directions' denominators
    masked = logits.clone()
    masked[1, 2] = masked[2, 1] = -math.inf
    expected = (-masked.log_softmax(1).diagonal().mean() - masked.log_softmax(0).diagonal().mean()) / 2
    assert excluded(same, scores)["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # two captions of one video, nothing else: no negative left, loss 0
    assert excluded(_batch([3, 3]), Scores(cos=torch.eye(2), logits=torch.eye(2)))["total"].item() == 0.0
    with pytest.raises(ValueError, match="same_video"):
        build_loss("infonce", {"same_video": "positive"})


def test_batches_carry_rows_ids_and_the_positives_of_shared_videos(tiny_features):
    arrays = load_split(tiny_features / "train")
    data = PairData(arrays)
    first_video = [i for i, v in enumerate(arrays.text_to_video) if v == arrays.text_to_video[0]]
    assert len(first_video) >= 2  # the tiny preset has several captions per video
    rows = torch.tensor([first_video[0], len(arrays.text_ids) - 1, first_video[1]])
    batch = data.batch(rows)
    assert batch.text_ids == [arrays.text_ids[r] for r in rows.tolist()]
    assert batch.video_rows.tolist() == arrays.text_to_video[rows.numpy()].tolist()
    expected = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert torch.equal(batch.positives, expected)
    assert batch.text.dtype == torch.float32 and batch.frames.shape[:2] == (3, arrays.frames.shape[1])


@dataclass(frozen=True)
class _MarginConfig:
    weight: float = setting(1.0, help="Weight of the margin.")


class _Margin(Loss):
    """A plugin's loss: the mean over texts of the mean logit minus the positive's."""

    name = "mean-margin"
    Config = _MarginConfig

    def __call__(self, batch, scores):
        return {"total": self.cfg.weight * (scores.logits.mean(1) - scores.logits.diagonal()).mean()}


def test_a_plugin_loss_by_entry_point_trains(monkeypatch, tiny_features, tmp_path):
    """An entry point in group tmass.losses adds a loss without touching tmass."""
    entry_point = SimpleNamespace(name="mean-margin", load=lambda: _Margin)
    monkeypatch.setattr(registry, "_plugins", lambda: {"mean-margin": entry_point})
    assert loss_names()[:2] == ("infonce", "triplet-hn") and loss_names()[-1] == "mean-margin"
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.0, final_eval=False, loss="mean-margin",
                      loss_options={"weight": 0.5})
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="xpool"), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["loss"] == "mean-margin" and config["train"]["loss_options"] == {"weight": 0.5}


@pytest.mark.parametrize("loss", ["infonce", "triplet-hn"])
def test_every_registered_loss_trains_a_tmass_head(loss, tiny_features, tmp_path):
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.0, final_eval=False, loss=loss)
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="tmass"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "total" in r]
    assert {"s", "sup"} <= set(steps[0]) and all(math.isfinite(r["total"]) for r in steps)
    if loss == "triplet-hn":
        assert {"s.t2v", "s.v2t", "sup.t2v", "sup.v2t"} <= set(steps[0])
        assert steps[0]["total"] == pytest.approx(steps[0]["s"] + 0.8 * steps[0]["sup"], rel=1e-6)
    assert torch.tensor([r["total"] for r in steps[-5:]]).mean() < torch.tensor([r["total"] for r in steps[:5]]).mean()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["loss"] == loss and config["train"]["loss_options"] == build_loss(loss).cfg.__dict__


def test_training_curves_draw_the_terms_the_log_names(monkeypatch, tmp_path):
    """Whatever terms a loss logs are drawn, by their logged names; a lone term is its own total."""
    from tmass.evaluate import figures

    drawn = {}

    def keep(fig, path):
        drawn["fig"] = fig
        return path

    monkeypatch.setattr(figures, "_save", keep)
    (tmp_path / "config.json").write_text(json.dumps({"head": {"head": "tmass"}}))
    for terms, expected in (({"s": 1.0, "s.t2v": 0.4, "sup": 2.0, "total": 2.6}, ["s", "s.t2v", "sup", "total"]),
                            ({"ce": 1.0, "total": 1.0}, ["ce"])):
        records = [{"event": "start", "step": 0}] + [
            {"step": i, "epoch": 0, "lr": 1e-3, **{k: v / i for k, v in terms.items()}, "logit_scale": 100.0}
            for i in range(1, 4)]
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        drawn.clear()
        figures.plot_training_curves(tmp_path)
        axis = drawn["fig"].axes[0]
        assert [t.get_text() for t in axis.get_legend().get_texts()] == expected
        assert [list(line.get_ydata()) for line in axis.get_lines()] == [[terms[k] / i for i in (1, 2, 3)] for k in expected]
        figures.plt.close(drawn["fig"])


def test_a_run_saved_before_the_loss_registry_resumes(tiny_features, tmp_path):
    """Its checkpoint names no loss: it trained with InfoNCE's defaults, and resumes so."""
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.0, final_eval=False)
    out = tmp_path / "run"
    train(tiny_features, out, cfg, HeadConfig(head="xpool"), progress=False, stop_after=5)
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    del checkpoint["train_config"]["loss"], checkpoint["train_config"]["loss_options"]
    torch.save(checkpoint, out / "last.pt")
    assert train(tiny_features, out, cfg, HeadConfig(head="xpool"), progress=False, resume=True)["steps"] == 32
