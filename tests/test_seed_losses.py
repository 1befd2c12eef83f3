"""The seed papers' losses (s-ndcg, selhn, triplet-sn, kendall, unified) and their pseudo
labels: hand-computed cases, the unified loss's two reductions, gradients, whole lists,
same-video captions, relevance files, and a few training steps of each with T-MASS."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tmass.features.format import load_split
from tmass.train.data import Batch
from tmass.train.heads import HeadConfig
from tmass.train.losses import Scores, build_loss, loss_names
from tmass.train.losses.bcls import kendall_ranking, soft_negative_triplet
from tmass.train.losses.infonce import symmetric_infonce
from tmass.train.losses.relevance import caption_relevance, first_columns
from tmass.train.losses.selhn import selective_triplet
from tmass.train.losses.sndcg import smooth_ndcg
from tmass.train.losses.triplet import max_violation_triplet
from tmass.train.losses.unified import unified_pair_loss
from tmass.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED_LOSSES = ("s-ndcg", "selhn", "triplet-sn", "kendall", "unified")
COS = [[0.9, 0.5, 0.1], [0.2, 0.6, 0.65], [0.3, 0.0, 0.8]]


def _batch(video_rows, text=None) -> Batch:
    n = len(video_rows)
    text = torch.eye(n, 4) if text is None else torch.as_tensor(text, dtype=torch.float32)
    return Batch(torch.arange(n), torch.tensor(video_rows), [f"t{i}" for i in range(n)], text,
                 torch.zeros(n, 2, text.shape[1]), torch.ones(n, 2, dtype=torch.bool))


def _random_cos(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1)


def test_the_seed_losses_are_registered_with_their_settings_as_options():
    from tmass.train.cli import _config_fields

    assert set(SEED_LOSSES) <= set(loss_names())
    fields = _config_fields()
    for option, owners in (("relevance", {"s-ndcg", "kendall"}), ("ndcg_k", {"s-ndcg"}), ("epsilon", {"selhn"}),
                           ("mining_temperature", {"triplet-sn", "kendall"}), ("window", {"kendall"}),
                           ("temperature", {"unified"})):
        assert {owner for owner, _ in fields[option][2]} == owners
    assert {"selhn", "triplet-sn", "kendall", "unified"} <= {owner for owner, _ in fields["margin"][2]}


# ----------------------------------------------------------------------------- unified


def test_unified_hand_computed():
    """margin 0.2, tau 0.1, three distinct videos: tau log(1 + sum exp((s_n - s_p + m)/tau))."""
    c, m, tau = np.array(COS), 0.2, 0.1

    def one(row, pos):
        return tau * math.log(1 + sum(math.exp((s - pos + m) / tau) for s in row))

    t2v = np.mean([one([c[i, j] for j in range(3) if j != i], c[i, i]) for i in range(3)])
    v2t = np.mean([one([c[i, j] for i in range(3) if i != j], c[j, j]) for j in range(3)])
    parts = build_loss("unified", {"margin": m, "temperature": tau})(_batch([0, 1, 2]), Scores(torch.tensor(COS), None))
    assert parts["t2v"].item() == pytest.approx(t2v, rel=1e-5) and parts["v2t"].item() == pytest.approx(v2t, rel=1e-5)
    assert parts["total"].item() == pytest.approx(t2v + v2t, rel=1e-5)


def test_unified_reduces_to_triplet_hn_as_the_temperature_vanishes():
    cos, positives = _random_cos(6), _batch([0, 1, 1, 2, 3, 4]).positives
    hn = sum(max_violation_triplet(cos, positives, 0.2))
    for tau, bound in ((1e-2, 2 * 1e-2 * math.log(6)), (1e-6, 2 * 1e-6 * math.log(6))):
        unified = sum(unified_pair_loss(cos, positives, 0.2, tau))
        assert 0 <= (unified - hn).item() <= bound  # tau log(1 + sum e^{x/tau}) - max(0, max x) in [0, tau log B]
    assert sum(unified_pair_loss(cos, positives, 0.2, 1e-6)).item() == pytest.approx(hn.item(), abs=1e-5)


def test_unified_with_margin_zero_is_vlc_at_logit_scale_one_over_tau():
    cos, batch = _random_cos(6, seed=1), _batch([0, 1, 1, 2, 3, 4])
    tau = 0.05
    exclude = batch.positives & ~torch.eye(6, dtype=torch.bool)
    vlc = symmetric_infonce(cos / tau, exclude)
    infonce = build_loss("infonce", {"same_video": "excluded"})(batch, Scores(cos, cos / tau))["total"]
    unified = sum(unified_pair_loss(cos, batch.positives, 0.0, tau))
    assert (unified / (2 * tau)).item() == pytest.approx(vlc.item(), rel=1e-10)
    assert (unified / (2 * tau)).item() == pytest.approx(infonce.item(), rel=1e-10)


# ----------------------------------------------------------------------------- selhn, triplet-sn


def test_selhn_hand_computed():
    """margin 0.2, epsilon 0.1. Text 1's hardest negative (0.65) is within 0.05 of its
    positive (0.6): the condition holds, so its hinge is the mean over both negatives,
    (0 + 0.25) / 2; every other anchor is further apart and takes its hardest negative:
    video 1 (0.6 against 0.5, exactly 0.1 apart: not within) 0.1, video 2 0.05."""
    parts = build_loss("selhn", {"margin": 0.2, "epsilon": 0.1})(_batch([0, 1, 2]), Scores(torch.tensor(COS), None))
    assert parts["t2v"].item() == pytest.approx(0.125 / 3, rel=1e-6)
    assert parts["v2t"].item() == pytest.approx(0.15 / 3, rel=1e-6)


def test_selhn_is_triplet_hn_at_epsilon_zero_and_the_mean_triplet_at_a_large_epsilon():
    cos, batch = _random_cos(6, seed=2), _batch([0, 1, 1, 2, 3, 4])
    positives = batch.positives
    assert torch.equal(sum(selective_triplet(cos, positives, 0.3, 0.0)), sum(max_violation_triplet(cos, positives, 0.3)))
    c, neg = cos.numpy(), ~positives.numpy()
    hinge = np.maximum(0.3 + c - np.diag(c)[:, None], 0)
    hinge_v = np.maximum(0.3 + c - np.diag(c)[None, :], 0)
    mean_t2v = np.mean([hinge[i, neg[i]].mean() for i in range(6)])
    mean_v2t = np.mean([hinge_v[neg[:, j], j].mean() for j in range(6)])
    assert sum(selective_triplet(cos, positives, 0.3, 10.0)).item() == pytest.approx(mean_t2v + mean_v2t, rel=1e-10)


def test_triplet_sn_hand_computed_and_its_hard_limit():
    """margin 0.2, mining temperature 0.1: negatives weighted by softmax(s_n / 0.1)."""
    c, m, tau = np.array(COS), 0.2, 0.1

    def one(negs, pos):
        w = np.exp(np.array(negs) / tau) / np.exp(np.array(negs) / tau).sum()
        return float((w * np.maximum(0, m + np.array(negs) - pos)).sum())

    t2v = np.mean([one([c[i, j] for j in range(3) if j != i], c[i, i]) for i in range(3)])
    v2t = np.mean([one([c[i, j] for i in range(3) if i != j], c[j, j]) for j in range(3)])
    parts = build_loss("triplet-sn", {"margin": m, "mining_temperature": tau})(_batch([0, 1, 2]),
                                                                                Scores(torch.tensor(COS), None))
    assert parts["t2v"].item() == pytest.approx(t2v, rel=1e-5) and parts["v2t"].item() == pytest.approx(v2t, rel=1e-5)
    cos, positives = _random_cos(6, seed=3), _batch([0, 1, 1, 2, 3, 4]).positives
    assert sum(soft_negative_triplet(cos, positives, 0.2, 1e-4)).item() == pytest.approx(
        sum(max_violation_triplet(cos, positives, 0.2)).item(), abs=1e-6)


# ----------------------------------------------------------------------------- listwise


def test_smooth_ndcg_hand_computed():
    """One list: scores 0.3, 0.1, 0.2, relevance 1, 0.5, 0; temperature 0.1."""
    s, r, tau = np.array([0.3, 0.1, 0.2]), np.array([1.0, 0.5, 0.0]), 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rank = [1 + sum(sig((s[b] - s[a]) / tau) for b in range(3) if b != a) for a in range(3)]  # 1.39, 2.61, 2.0
    gain = 2 ** r - 1
    whole = sum(gain[a] / math.log2(1 + rank[a]) for a in range(3)) / (1 + gain[1] / math.log2(3))
    top1 = (gain[0] / math.log2(1 + rank[0])) / 1.0  # only item 0 has a smooth rank <= 1.5
    args = (torch.tensor(s[None]), torch.tensor(r[None]), torch.ones(1, 3, dtype=torch.bool))
    assert smooth_ndcg(*args, k=0, temperature=tau).item() == pytest.approx(whole, rel=1e-6)
    assert smooth_ndcg(*args, k=1, temperature=tau).item() == pytest.approx(top1, rel=1e-6)
    # an item outside the list (valid False) changes nothing, whatever its score
    padded = (torch.tensor([[*s, 0.9]]), torch.tensor([[*r, 1.0]]), torch.tensor([[True, True, True, False]]))
    assert smooth_ndcg(*padded, k=0, temperature=tau).item() == pytest.approx(whole, rel=1e-6)


def test_a_listwise_loss_sees_the_whole_list():
    """Every item of a list gets a gradient from S-NDCG (k = 0), where the hardest-negative
    triplet touches two entries per row; permuting a list's items changes nothing."""
    scores = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)[None].clone()
    relevance = torch.tensor([[1.0, 0.2, 0.7, 0.0, 0.4, 0.9, 0.1, 0.3]], dtype=torch.float64)
    valid = torch.ones(1, 8, dtype=torch.bool)
    scores.requires_grad_()
    smooth_ndcg(scores, relevance, valid, 0, 0.2).sum().backward()
    assert (scores.grad.abs() > 1e-6).all()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert smooth_ndcg(scores[:, perm], relevance[:, perm], valid, 0, 0.2).item() == pytest.approx(
        smooth_ndcg(scores, relevance, valid, 0, 0.2).item(), rel=1e-12)


def test_kendall_hand_computed():
    """scores 0.9, 0.5, 0.7, 0.2; labels 1, 0.6, 0, 0.55; window 2, label noise 0.1,
    temperature 0.5. Label order: items 0, 1, 3, 2. Item 0 against 1 and 3: the harder
    is tanh(0.4/0.5); item 1 against 3 is skipped (labels 0.05 apart), against 2:
    tanh(-0.2/0.5); item 3 against 2: tanh(-0.5/0.5)."""
    args = (torch.tensor([[0.9, 0.5, 0.7, 0.2]]), torch.tensor([[1.0, 0.6, 0.0, 0.55]]), torch.ones(1, 4, dtype=torch.bool))
    expected = 1 - (math.tanh(0.8) + math.tanh(-0.4) + math.tanh(-1.0)) / 3
    assert kendall_ranking(*args, window=2, label_noise=0.1, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)
    # equal labels are ordered by the model's score, so a window of 1 meets the hardest
    # irrelevant item (score 0.4) right after the relevant one; pairs of equal labels are noise
    args = (torch.tensor([[0.5, 0.1, 0.4, 0.3]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert kendall_ranking(*args, window=1, label_noise=0.0, temperature=0.5).item() == pytest.approx(
        1 - math.tanh(0.2), rel=1e-6)


def test_lists_without_items_outside_them_take_the_short_path_to_the_same_values():
    """valid None (every item in every list, as when no two captions share a video) skips
    the masks; the values are those of an all-True valid. Without shared videos the
    pseudo labels skip the max over a video's captions, with the same labels."""
    scores = _random_cos(6, seed=9)[:, :5]  # 6 lists of 5 items
    relevance = torch.rand(6, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    valid = torch.ones(6, 5, dtype=torch.bool)
    assert torch.equal(smooth_ndcg(scores, relevance, None, 3, 0.2), smooth_ndcg(scores, relevance, valid, 3, 0.2))
    assert torch.equal(kendall_ranking(scores, relevance, None, 2, 0.05, 0.3),
                       kendall_ranking(scores, relevance, valid, 2, 0.05, 0.3))
    text = torch.randn(5, 8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(caption_relevance(text, None, 0.5), caption_relevance(text, torch.eye(5, dtype=torch.bool), 0.5))


@pytest.mark.parametrize("name", ["unified", "selhn", "triplet-sn", "kendall-rank", "s-ndcg-lists"])
def test_gradcheck_float64(name):
    cos = _random_cos(5, seed=5).requires_grad_()
    positives = _batch([0, 1, 1, 2, 3]).positives
    relevance = torch.rand(5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    valid = torch.ones(5, 5, dtype=torch.bool)
    fn = {
        "unified": lambda c: sum(unified_pair_loss(c, positives, 0.2, 0.1)),
        "selhn": lambda c: sum(selective_triplet(c, positives, 0.2, 0.3)),
        "triplet-sn": lambda c: sum(soft_negative_triplet(c, positives, 0.2, 0.1)),
        "kendall-rank": lambda c: kendall_ranking(c, relevance, valid, 2, 0.05, 0.3),
        "s-ndcg-lists": lambda c: smooth_ndcg(c, relevance, valid, 0, 0.2),
    }[name]
    assert torch.autograd.gradcheck(fn, (cos,))


@pytest.mark.parametrize("loss", SEED_LOSSES)
def test_captions_of_one_video_are_never_negatives(loss):
    """Captions 1 and 2 share a video. Entries (1, 2) and (2, 1) are no negatives: the
    pairwise part gives them no gradient; for the listwise ones they are fully relevant."""
    text = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    batch = _batch([0, 1, 1, 2], text)
    cos = _random_cos(4, seed=8).float().requires_grad_()
    instance = build_loss(loss)
    parts = instance(batch, Scores(cos, cos * 20))
    pairwise = {"s-ndcg": "infonce", "kendall": "triplet"}.get(loss, "total")
    parts[pairwise].backward()
    assert torch.equal(cos.grad[[1, 2], [2, 1]], torch.zeros(2))
    if pairwise != "total":
        assert torch.equal(instance.relevance(batch)[[1, 2], [2, 1]], torch.ones(2))


# ----------------------------------------------------------------------------- pseudo labels


def test_caption_relevance_by_the_best_caption_of_each_video():
    """t0 = e0, t1 = (e0 + e1)/sqrt 2, t2 = e2; captions 1 and 2 show one video. Floor
    0.5: cos 0.707 -> 0.414; a video is as relevant as its best caption; positives 1."""
    text = [[1, 0, 0], [2 ** -0.5, 2 ** -0.5, 0], [0, 0, 1]]
    batch = _batch([0, 1, 1], text)
    relevance = caption_relevance(batch.text, batch.positives, 0.5)
    part = (2 ** -0.5 - 0.5) / 0.5
    assert torch.allclose(relevance, torch.tensor([[1, part, part], [part, 1, 1], [0, 1, 1]]), atol=1e-6)
    assert first_columns(_batch([0, 1, 1, 0, 2]).positives).tolist() == [True, True, False, False, True]


def _relevance_file(tmp_path, matrix, text_ids, video_ids, kind="npz"):
    if kind == "npz":
        path = tmp_path / "rel.npz"
        np.savez(path, relevance=np.asarray(matrix), text_ids=np.array(text_ids), video_ids=np.array(video_ids))
    else:
        path = tmp_path / "rel.npy"
        np.save(path, np.asarray(matrix))
        path.with_suffix(".ids.json").write_text(json.dumps({"text_ids": text_ids, "video_ids": video_ids}))
    return str(path)


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_a_relevance_file_replaces_the_pseudo_labels(tmp_path, kind):
    # the file's ids in another order than the split's, and one caption more
    path = _relevance_file(tmp_path, [[0.2, 0.3], [0.9, 0.0], [0.5, 0.6]], ["c1", "c0", "extra"], ["v1", "v0"], kind)
    loss = build_loss("s-ndcg", {"relevance": path})
    loss.prepare(["c0", "c1"], ["v0", "v1"])
    batch = Batch(torch.tensor([1, 0]), torch.tensor([0, 1]), ["c1", "c0"], torch.zeros(2, 3), torch.zeros(2, 1, 3),
                  torch.ones(2, 1, dtype=torch.bool))
    # rows: c1 (file row 0), c0 (row 1); columns: v0 (file col 1), v1 (col 0); the diagonal is positive
    assert torch.allclose(loss.relevance(batch), torch.tensor([[1.0, 0.2], [0.0, 1.0]]))


def test_relevance_file_mistakes_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--relevance .*nope.npz: no such file$"):
        build_loss("kendall", {"relevance": str(tmp_path / "nope.npz")})
    bad_shape = _relevance_file(tmp_path, [[0.1, 0.2]], ["c0", "c1"], ["v0", "v1"], "npy")
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \[n_text, n_video\] = \[2, 2\]"):
        build_loss("kendall", {"relevance": bad_shape})
    out_of_range = _relevance_file(tmp_path, [[1.5]], ["c0"], ["v0"])
    with pytest.raises(ValueError, match=r"finite numbers in \[0, 1\]"):
        build_loss("kendall", {"relevance": out_of_range})
    loss = build_loss("kendall", {"relevance": _relevance_file(tmp_path, [[0.5]], ["c0"], ["v0"])})
    with pytest.raises(ValueError, match=r"1 training caption ids are not in it \(first: 'c9'\)"):
        loss.prepare(["c0", "c9"], ["v0"])


def test_train_cli_reports_a_bad_relevance_file_in_one_line(tiny_features, tmp_path):
    from tmass.cli import main

    result = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(tmp_path / "run"),
                                       "--loss", "kendall", "--relevance", str(tmp_path / "missing.npz")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: --relevance {tmp_path / 'missing.npz'}: no such file"


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss", SEED_LOSSES)
def test_each_seed_loss_trains_a_tmass_head(loss, tiny_features, tmp_path):
    """A few steps with the stochastic and support terms: the loss's parts are logged per
    term and stay finite."""
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.0, final_eval=False, loss=loss)
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="tmass"), progress=False, stop_after=3)
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "total" in r]
    assert len(steps) == 3 and {"s", "sup"} <= set(steps[0])
    assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    assert steps[0]["total"] == pytest.approx(steps[0]["s"] + 0.8 * steps[0]["sup"], rel=1e-5)


def test_a_relevance_file_trains_through_the_split_ids(tiny_features, tmp_path):
    arrays = load_split(tiny_features / "train")
    rng = np.random.default_rng(0)
    path = _relevance_file(tmp_path, rng.random((len(arrays.text_ids), len(arrays.video_ids))),
                           arrays.text_ids, arrays.video_ids)
    cfg = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.1, final_eval=False, loss="kendall",
                      loss_options={"relevance": path})
    train(tiny_features, tmp_path / "run", cfg, HeadConfig(head="xpool"), progress=False, stop_after=2,
          evaluate=lambda *args: {"t2v": {"R1": 0.0}})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["loss_options"]["relevance"] == path


def test_the_losses_sweep_reads_the_loss_registry():
    """Every registered loss with meanP, X-Pool and T-MASS; the default loss shares the
    heads sweep's runs, every other loss trains its own."""
    from tmass.sweep import SWEEP_NAMES, heads_sweep, losses_sweep

    sweep = losses_sweep()
    assert "losses" in SWEEP_NAMES and len(sweep.variants) == 3 * len(loss_names())
    assert [v.name for v in sweep.variants[:3]] == ["meanP / infonce", "X-Pool / infonce", "T-MASS / infonce"]
    heads = {v.run_key() for v in heads_sweep().variants}
    assert {v.run_key() for v in sweep.variants[:3]} <= heads
    keys = [v.run_key() for v in sweep.variants]
    assert len(set(keys)) == len(keys) and all(("loss=" + v.name.split(" / ")[1]) in v.run_key()
                                               for v in sweep.variants[3:])
    assert sweep.variants[-1].train == {"loss_terms": ("s", "sup"), "support_weight": 0.8, "loss": "unified"}
