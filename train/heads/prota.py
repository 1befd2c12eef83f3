"""Probabilistic token aggregation (``prota``, related-abstracts-a.txt, ProTA).

Word tokens and frame tokens are matched by dual partial-related aggregation, in the
CLIP space and in a learned low-dimensional space; in the low space each token is a
Gaussian, aligned by sampling during training, and an adaptive contrastive loss keeps
the distributions compact. Axis names: :mod:`tmass.train.heads.base`.

For one pair, with w_k the caption's real word tokens (SOT to EOT) and f_j its real
frames, tau = ``match_temperature``::

    high space:  a_k = w_k / |w_k|,             b_j = f_j / |f_j|
    low space:   a_k = P_t w_k / |P_t w_k|,     b_j = P_v f_j / |P_v f_j|     P [low_dim, dim]
    C_kj     = <a_k, b_j>                                            [n_token, n_frames]
    r_k      = sum_j softmax_j(C_kj / tau) C_kj                      word k's related frames
    PA(a, b) = sum_k pi_k r_k,   pi = softmax over real k of <u, w_k>
    s(t, v)  = 1/2 (PA_high + PA_low(mu))                            the score

    token Gaussians (low space): z = mu + sigma * eps,  mu = the low-space token,
        sigma = softplus(W_s mu + b_s) [low_dim],  eps ~ N(0, I)
    adaptive contrastive loss (training, B pairs, sampled tokens z, one draw per step):
        S~_ij  = PA_low(z(t_i), z(v_j)),  m_i = ``acl_margin`` * mean sigma of pair i's tokens
        L_acl  = ``acl_weight`` * InfoNCE_sym(logit_scale * (S~ - diag(m)))
        L_kl   = ``kl_weight`` * mean over tokens of KL(N(mu, sigma^2) || N(mu, I))

Choices where the abstract is silent:

* "Partial-related" aggregation: each token pools only the tokens of the other side that
  relate to it (a softmax with a low temperature, a soft maximum), so a caption need not
  match the parts of the video it does not describe (content asymmetry). Only the words
  aggregate: a frame-to-word direction would ask every frame to find its words, which is
  the asymmetry ProTA sets out to avoid (and would double the head's cost). Words are
  weighted by a learned importance (u = 0 at init: uniform).
* "Low- and high-dimensional" spaces: the CLIP space itself and a linear projection of it
  (``low_dim``), P_t and P_v starting from the same random Gaussian map (a
  Johnson-Lindenstrauss projection, so the untrained low space mirrors the high one).
* Video tokens are the frames (the registry's features are fixed per head, and frames
  are always extracted); patch tokens are not used.
* Sampling only shapes training (L_acl). The score is the mean path, PA on the token
  means: deterministic, a function of the pair alone, and free of the trials x
  n_token x n_frames cost that keyed per-token sampling would add at evaluation (the
  evaluator's keyed noise is one vector per pair and trial, not one per token). The
  training draws come from torch's generator, seeded by the run like dropout.
* The adaptive contrastive loss enters as the extra terms ``head.acl`` and ``head.kl``
  (:meth:`RetrievalHead.train_scores`), added to the chosen loss on the mean-path
  scores. The margin grows with the pair's uncertainty (an uncertain positive must win
  by more) while the KL term keeps sigma from collapsing: together they pull the
  distributions in tight around matching pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import setting
from tmass.train.heads.base import RetrievalHead, TextFeatures, VideoFeatures, logit_scale_parameter, map_video_blocks
from tmass.train.registry import BaseHeadConfig, HeadSpec

INITIAL_SIGMA = 0.05  # softplus(b_s) at init: small next to a unit token's low_dim ** -0.5 entries


@dataclass
class ProTAConfig(BaseHeadConfig):
    """ProTA's settings."""

    head: str = setting("prota", cli=False, help="The registered head's name.")
    low_dim: int = setting(64, bounds="[1, inf)", help="ProTA's low-dimensional token space.")
    match_temperature: float = setting(0.01, bounds="(0, inf)",
                                       help="Temperature of ProTA's partial-related token matching (a soft maximum).")
    acl_weight: float = setting(1.0, bounds="[0, inf)", help="Weight of ProTA's adaptive contrastive loss (head.acl).")
    acl_margin: float = setting(1.0, bounds="[0, inf)", help="Margin per unit of token standard deviation in head.acl.")
    kl_weight: float = setting(1e-3, bounds="[0, inf)", help="Weight of the token Gaussians' KL term (head.kl).")


class ProTA(RetrievalHead):
    """Word tokens ``[n_text, n_token, dim]`` and frames ``[n_video, n_frames, dim]`` ->
    scores ``[n_text, n_video]`` (module doc)."""

    def __init__(self, cfg: ProTAConfig):
        super().__init__(cfg)
        dim, low = cfg.embed_dim, cfg.low_dim
        self.word_importance = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.word_importance.weight)
        self.project_text = nn.Linear(dim, low, bias=False)
        self.project_video = nn.Linear(dim, low, bias=False)
        with torch.no_grad():
            self.project_video.weight.copy_(self.project_text.weight.normal_(0.0, low ** -0.5))
        self.sigma = nn.Linear(low, low)
        nn.init.zeros_(self.sigma.weight)
        nn.init.constant_(self.sigma.bias, float(torch.tensor(INITIAL_SIGMA).expm1().log()))  # softplus^-1
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def _tokens(self, text: TextFeatures, video: VideoFeatures):
        """Masks, word weights pi ``[n_text, n_token]`` and the low-space means."""
        words, frames = text.tokens, video.frames
        wmask = text.token_mask
        fmask = video.frame_mask if video.frame_mask is not None else torch.ones(frames.shape[:2], dtype=torch.bool,
                                                                                 device=frames.device)
        pi = self.word_importance(words).squeeze(-1).masked_fill(~wmask, float("-inf")).softmax(-1)
        low = (F.normalize(self.project_text(words), dim=-1), F.normalize(self.project_video(frames), dim=-1))
        return wmask, fmask, pi, low

    def _aggregate(self, a: torch.Tensor, b: torch.Tensor, fmask, pi) -> torch.Tensor:
        """PA of unit tokens a ``[n_text, n_token, d]`` and b ``[n_video, n_frames, d]`` ->
        ``[n_text, n_video]``.

        Every word against every frame is one GEMM per block of videos
        (:func:`~tmass.train.heads.base.map_video_blocks`), C/tau as ``[n_vb, n_frames,
        n_text * n_token]``: frames in the middle, so that the softmax's max and sums
        over frames run along contiguous rows of words; 1/tau is folded into the words.
        ``tests/test_token_heads.py`` holds this equal to the equations, written out."""
        tau = self.cfg.match_temperature
        n_text, n_token, _ = a.shape
        n_video, n_frames, _ = b.shape
        words = a.flatten(0, 1).T / tau  # [d, n_text * n_token]
        padding = None if bool(fmask.all()) else torch.zeros(
            fmask.shape, dtype=a.dtype, device=a.device).masked_fill_(~fmask, float("-inf"))[..., None]

        def block(vs: slice) -> torch.Tensor:
            c = (b[vs].flatten(0, 1) @ words).view(-1, n_frames, n_text * n_token)  # C/tau [n_vb, n_frames, n_text * n_token]
            logits = c if padding is None else c + padding[vs]
            related = (logits - logits.amax(1, keepdim=True)).exp_()  # unnormalised softmax over frames
            r = (related * c).sum(1) / related.sum(1) * tau  # r_k [n_vb, n_text * n_token]
            return (r.view(-1, n_text, n_token) * pi).sum(-1)  # [n_vb, n_text]

        return torch.cat(map_video_blocks(block, n_video, n_frames * n_text * n_token)).T

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """s(t, v) = 1/2 (PA_high + PA_low on the token means), ``[n_text, n_video]``."""
        _, fmask, pi, (a_low, b_low) = self._tokens(text, video)
        high = self._aggregate(F.normalize(text.tokens, dim=-1), F.normalize(video.frames, dim=-1), fmask, pi)
        return (high + self._aggregate(a_low, b_low, fmask, pi)) / 2

    def train_scores(self, text: TextFeatures, video: VideoFeatures) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean-path scores ``[B, B]``, and ``acl`` and ``kl`` on one draw of the token
        Gaussians (module doc)."""
        cos = self.score(text, video)
        cfg = self.cfg
        if cfg.acl_weight == 0 and cfg.kl_weight == 0:
            return cos, {}
        wmask, fmask, pi, (a_low, b_low) = self._tokens(text, video)
        sig_t, sig_v = F.softplus(self.sigma(a_low)), F.softplus(self.sigma(b_low))  # [B, n, low_dim]
        z_t = F.normalize(a_low + sig_t * torch.randn_like(a_low), dim=-1)
        z_v = F.normalize(b_low + sig_v * torch.randn_like(b_low), dim=-1)
        sampled = self._aggregate(z_t, z_v, fmask, pi)  # [B, B]
        mean_sigma = ((sig_t.mean(-1) * wmask).sum(-1) / wmask.sum(-1).clamp_min(1)
                      + (sig_v.mean(-1) * fmask).sum(-1) / fmask.sum(-1).clamp_min(1)) / 2  # [B]
        logits = self.logit_scale() * (sampled - torch.diag(cfg.acl_margin * mean_sigma))
        targets = torch.arange(len(logits), device=logits.device)
        acl = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

        def kl(sigma, mask):  # KL(N(mu, sigma^2) || N(mu, I)) per token, mean over real tokens
            per_token = 0.5 * (sigma.square() - 1 - 2 * sigma.log()).sum(-1)
            return (per_token * mask).sum() / mask.sum().clamp_min(1)

        return cos, {"acl": cfg.acl_weight * acl,
                     "kl": cfg.kl_weight * (kl(sig_t, wmask) + kl(sig_v, fmask)) / 2}


SPEC = HeadSpec("prota", "ProTA", ProTAConfig, ProTA, features={"frames", "word_tokens"},
                summary="probabilistic token aggregation: partial-related word-frame matching in the CLIP and a "
                        "low-dimensional space, Gaussian tokens and an adaptive contrastive loss in training")
