"""Token-level heads (tc-mgc, prota, visern): token features reach their scoring and
training, a split without them is one line naming the option, and each head's
documented behaviour (its switches, its extra loss terms, its untrained function) holds.
(`tmass check-head` on every registered head is in test_registry.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from tmass.checkhead import random_features
from tmass.cli import main
from tmass.features.format import SplitArrays, load_split
from tmass.evaluate import split_metrics
from tmass.train.data import PairData, declared_only, load_declared, split_validation
from tmass.train.heads.base import split_features
from tmass.train.losses import batch_losses, build_loss
from tmass.train.registry import head_spec
from tmass.train.trainer import TrainConfig, load_checkpoint, train

TOKEN_HEADS = {"tc-mgc": {"head.sdr"}, "prota": {"head.acl", "head.kl"}, "visern": set()}


def _build(name, dim=32, frames=6, **fields):
    spec = head_spec(name)
    return spec.build(spec.make_config(embed_dim=dim, num_frames=frames, **fields))


def test_validation_hold_out_keeps_token_features_aligned(tiny_token_features):
    arrays = load_split(tiny_token_features / "train")
    fit, val = split_validation(arrays, 0.25)
    for part in (fit, val):
        rows = [arrays.text_ids.index(t) for t in part.text_ids]
        np.testing.assert_array_equal(part.token_embeddings, arrays.token_embeddings[rows])
        np.testing.assert_array_equal(part.token_mask, arrays.token_mask[rows])
        videos = [arrays.video_ids.index(v) for v in part.video_ids]
        np.testing.assert_array_equal(part.patch_embeddings, arrays.patch_embeddings[videos])


@pytest.mark.parametrize("name", sorted(TOKEN_HEADS))
def test_a_token_head_trains_on_its_tokens_with_its_own_loss_terms(tiny_token_features, name):
    arrays = load_split(tiny_token_features / "train")
    data = PairData(arrays)
    batch = data.batch(torch.arange(0, 40, 5))
    assert batch.tokens.shape[:2] == batch.token_mask.shape and batch.patches.shape[:3] == (8, *arrays.frames.shape[1:2], 4)
    torch.manual_seed(0)
    head = _build(name, dim=arrays.meta.embed_dim, frames=arrays.frames.shape[1]).train()
    terms = batch_losses(head, batch, build_loss("infonce"), ("ce",))
    assert {t for t in terms if t.startswith("head.")} == TOKEN_HEADS[name]
    assert torch.isclose(terms["total"], terms["ce"] + sum(terms[t] for t in TOKEN_HEADS[name]))
    terms["total"].backward()
    assert all(p.grad is not None for p in head.parameters())
    # the batch's token features are the ones scored: the scores change when they do
    # (weights moved off their init first: untrained, visern ignores its patches)
    text, video = batch.features()
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.1 * torch.randn_like(param))
        base = head.score(text, video)
        text.tokens, video.patches = text.tokens.flip(0), video.patches.flip(0)
        moved = head.score(text, video)
    assert not torch.allclose(base, moved)


@pytest.mark.parametrize("name", ["meanp", *sorted(TOKEN_HEADS)])
def test_a_batch_carries_the_token_features_its_head_declares_and_no_others(tiny_token_features, name):
    arrays = load_split(tiny_token_features / "train")
    needs = head_spec(name).features
    rows = torch.arange(0, 40, 5)
    everything, declared = PairData(arrays).batch(rows), PairData(declared_only(arrays, needs)).batch(rows)
    read = {"tokens": "word_tokens", "token_mask": "word_tokens", "patches": "patch_tokens"}
    for field in ("text", "frames", "frame_mask", "tokens", "token_mask", "patches"):
        if read.get(field, "frames") in needs:  # what the head reads: the tensors it was given before
            assert torch.equal(getattr(declared, field), getattr(everything, field)), field
        else:
            assert getattr(everything, field) is not None and getattr(declared, field) is None, field


@pytest.mark.parametrize("name", ["meanp", *sorted(TOKEN_HEADS)])
def test_a_split_is_read_with_the_token_features_its_head_declares_and_no_others(tiny_token_features, name):
    """Reading only the declared token features gives what dropping the others after
    reading everything gave: the same arrays, None for the undeclared ones."""
    needs = head_spec(name).features
    read = load_declared(tiny_token_features / "train", needs)
    dropped = declared_only(load_split(tiny_token_features / "train"), needs)
    assert read.token_embeddings is None if "word_tokens" not in needs else read.token_embeddings is not None
    assert read.patch_embeddings is None if "patch_tokens" not in needs else read.patch_embeddings is not None
    for field in dataclasses.fields(SplitArrays):
        mine, theirs = getattr(read, field.name), getattr(dropped, field.name)
        same = np.array_equal(mine, theirs) if isinstance(mine, np.ndarray) else mine == theirs
        assert same, field.name


@pytest.mark.parametrize("name", ["tc-mgc", "visern"])
def test_a_token_head_trains_to_the_same_weights_as_on_every_token_feature(tiny_token_features, tmp_path, monkeypatch,
                                                                           name):
    """A short run with validation: the same weights as when every token feature was
    loaded, held out, batched and validated (the data as train assembled it before)."""
    def weights(out):
        train(tiny_token_features, out, TrainConfig(max_steps=4, batch_size=8, val_fraction=0.25, val_every=2,
                                                    final_eval=False), head_spec(name).make_config(),
              progress=False, evaluate=split_metrics)
        return load_checkpoint(out / "last.pt")[0].state_dict()

    declared = weights(tmp_path / "declared")
    monkeypatch.setattr("tmass.train.trainer.load_declared", lambda split_dir, needs: load_split(split_dir))
    everything = weights(tmp_path / "everything")
    assert declared.keys() == everything.keys()
    assert all(torch.equal(declared[k], everything[k]) for k in declared)


@pytest.fixture(scope="module")
def token_runs(tiny_token_features, tmp_path_factory):
    """Untrained runs (--epochs 0) of tc-mgc, visern and xpool on the token features."""
    root = tmp_path_factory.mktemp("token-runs")
    for name in ("tc-mgc", "visern", "xpool"):
        result = CliRunner().invoke(main, ["train", "--features", str(tiny_token_features), "--head", name, "--epochs", "0",
                                           "--val-fraction", "0", "--no-final-eval", "--no-progress", "--device", "cpu",
                                           "--out", str(root / name)])
        assert result.exit_code == 0, result.output
    return root


def _refused(result, *expected):
    """One ``Error:`` line holding every ``expected`` part, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and all(part in errors[0] for part in expected), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("name,need", [("tc-mgc", "word tokens: extract with --text-tokens"),
                                       ("prota", "word tokens: extract with --text-tokens"),
                                       ("visern", "patch tokens: extract with --patch-grid G")])
def test_train_refuses_a_head_whose_tokens_are_missing_before_writing_anything(tiny_features, tmp_path, name, need):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--head", name,
                                       "--out", str(out), "--epochs", "1", "--device", "cpu"])
    _refused(result, f"Error: head {name} needs {need}")
    assert not out.exists()  # no run directory, lock, config or checkpoint
    with pytest.raises(ValueError, match=f"head {name} needs {need}"):
        split_features(load_split(tiny_features / "test"), head_spec(name).features, name)


def test_eval_refuses_a_token_head_on_features_without_its_tokens(tiny_features, token_runs):
    for name, need in (("tc-mgc", "word tokens: extract with --text-tokens"),
                       ("visern", "patch tokens: extract with --patch-grid G")):
        result = CliRunner().invoke(main, ["eval", "--features", str(tiny_features), "--checkpoint",
                                           str(token_runs / name / "best.pt"), "--device", "cpu"])
        _refused(result, f"head {name} needs {need}", str(tiny_features / "test"))


@pytest.mark.parametrize("sweep", ["heads", "tc-mgc"])
def test_ablate_names_every_head_missing_its_tokens_before_any_run(tiny_features, tmp_path, sweep):
    out = tmp_path / "ablate"
    result = CliRunner().invoke(main, ["ablate", "--features", str(tiny_features), "--out", str(out), "--sweeps", sweep,
                                       "--seeds", "0", "--epochs", "1", "--device", "cpu"])
    if sweep == "heads":
        _refused(result, "heads tc-mgc, prota need word tokens: extract with --text-tokens",
                 "head visern needs patch tokens: extract with --patch-grid G")
    else:
        _refused(result, "head tc-mgc needs word tokens: extract with --text-tokens")
        assert "visern" not in result.output
    assert not out.exists()  # no run started


def test_index_and_search_refuse_a_token_head(tiny_token_features, token_runs, tmp_path):
    split = tiny_token_features / "test"
    refused = CliRunner().invoke(main, ["index", "--features", str(split), "--out", str(tmp_path / "idx"),
                                        "--checkpoint", str(token_runs / "tc-mgc" / "best.pt")])
    _refused(refused, "head tc-mgc needs word tokens: search keeps caption embeddings and frames only", "xpool")
    assert not (tmp_path / "idx").exists()
    # an index holding a token head (as one built before this check could): search says so in one line
    built = CliRunner().invoke(main, ["index", "--features", str(split), "--out", str(tmp_path / "old"),
                                      "--checkpoint", str(token_runs / "xpool" / "best.pt")])
    assert built.exit_code == 0, built.output
    (tmp_path / "old" / "head.pt").write_bytes((token_runs / "visern" / "best.pt").read_bytes())
    result = CliRunner().invoke(main, ["search", "--index", str(tmp_path / "old"), "--query-features", str(split)])
    _refused(result, "head.pt: head visern needs patch tokens: search keeps")


def test_tc_mgc_switches():
    spec = head_spec("tc-mgc")
    text, _, video, _ = random_features(spec, 5, 4, 0)
    torch.manual_seed(0)
    plain = _build("tc-mgc", sr=False, lsa=False, sdr=False)
    sims = plain.granularities(text, video)  # [5, 4, 3]
    assert torch.allclose(plain.score(text, video), sims.mean(-1))  # no LSA: the mean of the granularities
    assert plain.train_scores(text, video)[1] == {}  # no SDR: no extra term
    # untrained ISA weighs uniformly: without SR the sentence-frame similarity is the mean over frames
    f = F.normalize(video.frames, dim=-1)
    x_sf = torch.einsum("td,vjd->tvj", F.normalize(text.embedding, dim=-1), f)
    mask = video.frame_mask.float()
    assert torch.allclose(sims[..., 1], (x_sf * mask).sum(-1) / mask.sum(-1), atol=1e-6)
    # SR: the mean of the sr_keep largest, and k x k aggregation weights instead of n_frames x n_frames
    sr = _build("tc-mgc", sr=True, sr_keep=2)
    top = x_sf.masked_fill(~video.frame_mask, -2).topk(2, dim=-1).values.mean(-1)
    assert torch.allclose(sr.granularities(text, video)[..., 1], top, atol=1e-6)
    assert sr.isa_frames.mix.weight.shape == (2, 2) and plain.isa_frames.mix.weight.shape == (6, 6)
    # SDR: the weighted variance of the matching pairs' granularities
    with_sdr = _build("tc-mgc", sdr=True, sdr_weight=2.0)
    diag = with_sdr.granularities(text[:4], video).diagonal(dim1=0, dim2=1).T
    _, extra = with_sdr.train_scores(text[:4], video)
    assert torch.isclose(extra["sdr"], 2.0 * diag.var(-1, unbiased=False).mean())


def test_untrained_visern_is_meanp_and_its_reasoning_uses_the_patches():
    spec = head_spec("visern")
    text, _, video, _ = random_features(spec, 5, 4, 0)
    head = _build("visern")
    mask = video.frame_mask.float()[..., None]
    mean = (F.normalize(video.frames, dim=-1) * mask).sum(1) / mask.sum(1)
    expected = F.normalize(text.embedding, dim=-1) @ F.normalize(mean, dim=-1).T
    assert torch.allclose(head.score(text, video), expected, atol=1e-6)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.1)
        before = head.score(text, video)
        video.patches = video.patches.roll(1, dims=0)
        assert not torch.allclose(before, head.score(text, video))


def test_prota_scores_are_the_mean_path_and_training_samples():
    spec = head_spec("prota")
    text, _, video, _ = random_features(spec, 4, 4, 0)
    head = _build("prota")
    first = head.score(text, video)
    assert torch.equal(first, head.score(text, video))  # deterministic: no noise at scoring
    torch.manual_seed(1)
    a = head.train_scores(text, video)[1]["acl"]
    torch.manual_seed(2)
    b = head.train_scores(text, video)[1]["acl"]
    assert not torch.isclose(a, b)  # the adaptive contrastive term is on sampled tokens


def _prota_by_the_equations(head, text, video):
    """ProTA's score pair by pair, as its module doc writes it: ``[n_text, n_video]``."""
    tau, rows = head.cfg.match_temperature, []
    for t in range(len(text)):
        w = text.tokens[t][text.token_mask[t]]  # the caption's real words
        pi = head.word_importance(w).squeeze(-1).softmax(-1)
        row = []
        for v in range(len(video)):
            f = video.frames[v][video.frame_mask[v]]  # the video's real frames

            def pa(a, b):
                c = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # C_kj
                return (pi * ((c / tau).softmax(-1) * c).sum(-1)).sum()

            row.append((pa(w, f) + pa(head.project_text(w), head.project_video(f))) / 2)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _tc_mgc_by_the_equations(head, text, video):
    """TC-MGC's granularities pair by pair, as its module doc writes them: ``[n_text, n_video, 3]``."""
    tau, n = head.cfg.attention_temperature, head.cfg.max_words
    rows = []
    for t in range(len(text)):
        s, w = F.normalize(text.embedding[t], dim=-1), F.normalize(text.tokens[t, :n], dim=-1)
        row = []
        for v in range(len(video)):
            f, mask = F.normalize(video.frames[v], dim=-1), video.frame_mask[v]

            def attend(x):  # cos(x, f~) for rows x [n, dim]
                q = x @ f.T + head.query_words(x) @ head.query_frames(f).T  # q(x, f_j)
                weights = (q / tau).masked_fill(~mask, float("-inf")).softmax(-1)
                return F.cosine_similarity(x, weights @ f, dim=-1)

            s_sf = head.isa_frames(f @ s, mask)
            s_wf = head.isa_words(attend(w), text.token_mask[t, :n])
            row.append(torch.stack((attend(s[None])[0], s_sf, s_wf)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("name,fields", [("prota", {}), ("tc-mgc", {}), ("tc-mgc", {"sr": False, "lsa": False})])
def test_the_word_frame_heads_compute_their_equations(monkeypatch, name, fields):
    """ProTA's and TC-MGC's blocked, batched scoring equals their equations written out
    pair by pair, in evaluation (blocks of one video on two threads) and in training (one
    block), gradients included."""
    import tmass.train.heads.base as base

    spec = head_spec(name)
    text, _, video, _ = random_features(spec, 5, 6, 0)
    torch.manual_seed(0)
    head = _build(name, frames=video.frames.shape[1], **fields)
    with torch.no_grad():  # off the zero init, so that every learned term takes part
        for param in head.parameters():
            param.add_(0.3 * torch.randn_like(param))
    by_pair = ((lambda h, t, v: h.combine(_tc_mgc_by_the_equations(h, t, v))) if name == "tc-mgc"
               else _prota_by_the_equations)

    reference = by_pair(head, text, video)
    reference.sum().backward()
    expected_grads = [p.grad for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    head.score(text, video).sum().backward()  # training: gradients through one block
    for param, expected in zip(head.parameters(), expected_grads):
        if expected is None:  # a parameter scoring does not use (the logit scale, ProTA's sigma)
            assert param.grad is None
        else:
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))

    threads = torch.get_num_threads()
    monkeypatch.setattr(base, "BLOCK_ELEMENTS", 1)
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            blocked = head.eval().score(text, video)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(blocked, reference.detach(), rtol=0, atol=1e-5)


def test_the_tc_mgc_sweep_switches_sr_sdr_lsa_and_shares_the_heads_run():
    from tmass.sweep import SWEEPS, heads_sweep

    variants = SWEEPS["tc-mgc"].variants
    configs = [head_spec("tc-mgc").make_config(**v.head) for v in variants]
    assert [(c.sr, c.sdr, c.lsa) for c in configs] == [(True, True, True), (False, True, True), (True, False, True),
                                                      (True, True, False), (False, False, False)]
    assert len({v.run_key() for v in variants}) == len(variants)
    heads = {v.name: v.run_key() for v in heads_sweep().variants}
    assert variants[0].run_key() == heads["TC-MGC"]
