"""Heads: shapes, the identity initialisation, radius variants, support text, masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tmass.train.heads import (
    LOGIT_SCALE_MAX,
    Head,
    HeadConfig,
    frame_similarity,
    paired_frame_similarity,
    stochastic_text,
    support_text,
)

DIM, FRAMES = 16, 5


def _inputs(n_text=3, n_video=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_text, DIM, generator=g) * 4, torch.randn(n_video, FRAMES, DIM, generator=g) * 4


@pytest.mark.parametrize("kind", ["meanp", "xpool", "tmass"])
def test_pooled_videos_are_text_major(kind):
    head = Head(HeadConfig(head=kind, embed_dim=DIM, num_frames=FRAMES)).eval()
    text, frames = _inputs()
    assert head.pool(text, frames).shape == (3, 4, DIM)  # [n_text, n_video, dim]
    assert head.stochastic == (kind == "tmass")


def test_identity_init_makes_xpool_a_known_function():
    """Identity projections, zero biases, unit LayerNorms: the first forward pass is
    LN(LN(sum_f softmax_f(LN(t).LN(f) / sqrt(dim)) LN(f)) * 2), i.e. an attention-
    weighted average of normalised frames with the text as query."""
    head = Head(HeadConfig(head="xpool", embed_dim=DIM, num_frames=FRAMES)).eval()
    text, frames = _inputs()
    ln = lambda x: F.layer_norm(x, (DIM,))  # noqa: E731
    weights = torch.softmax(torch.einsum("td,vfd->tvf", ln(text), ln(frames)) / math.sqrt(DIM), dim=-1)
    attended = torch.einsum("tvf,vfd->tvd", weights, ln(frames))
    expected = ln(2 * ln(attended))
    torch.testing.assert_close(head.pool(text, frames), expected, atol=1e-5, rtol=1e-5)


def test_dropout_acts_only_in_training():
    head = Head(HeadConfig(head="xpool", embed_dim=DIM, num_frames=FRAMES, dropout=0.5))
    text, frames = _inputs()
    torch.manual_seed(0)
    train_out = head.train().pool(text, frames)
    eval_out = head.eval().pool(text, frames)
    assert not torch.allclose(train_out, eval_out)
    torch.testing.assert_close(head.pool(text, frames), eval_out)


def test_padding_frames_are_ignored():
    """What a masked frame holds changes nothing: not the attention, not meanP, not S."""
    text, frames = _inputs()
    mask = torch.ones(4, FRAMES, dtype=torch.bool)
    mask[1, -2:] = False
    other = frames.clone()
    other[1, -2:] = 1e3
    for kind in ("meanp", "xpool"):
        head = Head(HeadConfig(head=kind, embed_dim=DIM, num_frames=FRAMES)).eval()
        torch.testing.assert_close(head.pool(text, frames, mask), head.pool(text, other, mask))
    s = frame_similarity(text, frames, mask)
    assert (s[:, 1, -2:] == 0).all() and torch.equal(s, frame_similarity(text, other, mask))


def test_meanp_is_text_independent_and_parameter_free_but_for_the_logit_scale():
    head = Head(HeadConfig(head="meanp", embed_dim=DIM, num_frames=FRAMES))
    assert [n for n, _ in head.named_parameters()] == ["log_logit_scale"]
    text, frames = _inputs()
    pooled = head.pool(text, frames)
    torch.testing.assert_close(pooled[0], pooled[2])
    torch.testing.assert_close(pooled[0], F.normalize(frames, dim=-1).mean(1))


def test_radius_variants():
    sims = torch.rand(3, 4, FRAMES)
    sim = Head(HeadConfig(head="tmass", embed_dim=DIM, num_frames=FRAMES, radius="sim")).radius
    scalar = Head(HeadConfig(head="tmass", embed_dim=DIM, num_frames=FRAMES, radius="scalar")).radius
    linear = Head(HeadConfig(head="tmass", embed_dim=DIM, num_frames=FRAMES, radius="linear")).radius
    assert sum(p.numel() for p in sim.parameters()) == 0
    assert sum(p.numel() for p in scalar.parameters()) == 1
    torch.testing.assert_close(sim(sims), sims.mean(-1, keepdim=True))
    torch.testing.assert_close(scalar(sims), sims.mean(-1, keepdim=True))  # theta starts at 1
    r = linear(sims)  # identity init: R's first n_frames coordinates are S, the rest 0
    assert r.shape == (3, 4, DIM)
    torch.testing.assert_close(r[..., :FRAMES], sims)
    assert (r[..., FRAMES:] == 0).all()


def test_support_text_sits_on_the_mass_surface_towards_the_video():
    g = torch.Generator().manual_seed(1)
    text, video = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    scalar_r = torch.randn(6, 1, generator=g)
    sup = support_text(text, scalar_r, video)
    offset = sup - text
    torch.testing.assert_close(offset.norm(dim=-1), scalar_r.exp().squeeze(-1))  # distance exp(R)
    torch.testing.assert_close(F.normalize(offset, dim=-1), F.normalize(video - text, dim=-1))  # along v - t
    vector_r = torch.randn(6, DIM, generator=g)
    torch.testing.assert_close(support_text(text, vector_r, video) - text,
                               vector_r.exp() * F.normalize(video - text, dim=-1))  # Eq. 8, elementwise


def test_stochastic_text_stays_inside_its_mass():
    head = Head(HeadConfig(head="tmass", embed_dim=DIM, num_frames=FRAMES))
    text, frames = _inputs(n_text=4, n_video=4)
    log_r = head.radius(paired_frame_similarity(text, frames))  # [4, dim]
    eps = head.sample_noise((4, DIM), torch.Generator().manual_seed(0))
    assert 0 <= eps.min() and eps.max() < 1  # U(0, 1) prior
    t_s = stochastic_text(text, log_r, eps)
    assert ((t_s - text) <= log_r.exp() + 1e-6).all() and ((t_s - text) >= 0).all()


def test_logit_scale_starts_from_the_manifest_and_is_capped_in_place():
    head = Head(HeadConfig(head="xpool", embed_dim=DIM, num_frames=FRAMES, logit_scale=50.0))
    assert head.logit_scale().item() == pytest.approx(50.0)
    with torch.no_grad():
        head.log_logit_scale.fill_(math.log(500.0))
    assert head.logit_scale().item() == pytest.approx(500.0)  # no clamp in the forward pass
    head.cap_logit_scale_()  # the trainer's, after each optimiser step
    assert head.logit_scale().item() == pytest.approx(LOGIT_SCALE_MAX)


def test_logit_scale_gradient_flows_at_clip_s_100():
    """float32(log 100) lies above math.log(100): a clamp in the forward pass zeroed this."""
    head = Head(HeadConfig(head="xpool", embed_dim=DIM, num_frames=FRAMES, logit_scale=100.0))
    head.logit_scale().backward()
    assert head.log_logit_scale.grad.item() == pytest.approx(100.0, rel=1e-6)  # d exp(x) / dx


def test_bad_configs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="unknown head"):
        HeadConfig(head="clip4clip")
    with pytest.raises(ValueError, match="radius"):
        HeadConfig(radius="quadratic")
    with pytest.raises(ValueError, match="does not divide"):
        HeadConfig(embed_dim=10, num_heads=3)
