"""Text-conditioned multi-grained contrast (``tc-mgc``, related-abstracts-b.txt, TC-MGC).

A language-video attention block aggregates the frames conditioned on each word and
the video conditioned on the sentence; the pair is compared at three granularities,
their similarity vectors are aggregated (ISA), optionally after a similarity
reorganisation (SR), and the three similarities are combined by a linear softmax
aggregation (LSA); a similarity decorrelation regulariser (SDR) is a training-time loss
term on matching pairs. Axis names: :mod:`tmass.train.heads.base`.

For one pair, with s the caption embedding, w_k the word tokens (k over the caption's
real tokens, SOT to EOT, the first ``max_words``), f_j the real frames, all
L2-normalised, and tau = ``attention_temperature``::

    q(x, f)  = <x, f> + <U x, V f>                        attention logit (U, V [query_rank, dim]; U = 0 at init)
    alpha_j  = softmax_j q(s, f_j) / tau                  sentence's attention over frames
    v_s      = sum_j alpha_j f_j                          sentence-conditioned video
    beta_kj  = softmax_j q(w_k, f_j) / tau                word k's attention over frames
    f~_k     = sum_j beta_kj f_j                          word-conditioned frame

    s_sv     = cos(s, v_s)                                sentence-video      (a scalar)
    x^sf_j   = cos(s, f_j)                                sentence-frame      [n_frames]
    x^wf_k   = cos(w_k, f~_k)                             word-frame          [n_token]
    s_sf     = ISA_f(x^sf),  s_wf = ISA_w(x^wf)

    ISA(x)   = sum_i a_i x_i,  a = softmax over the real i of (A x + b)    A [L, L], 0 at init
    SR(x)    = the top-k entries of x (k = ``sr_keep``) sorted descending  (before ISA)

    LSA:     s = sum_g gamma_g s_g,  gamma = softmax(U [s_sv, s_sf, s_wf] + c)   U [3, 3], 0 at init
    no LSA:  s = (s_sv + s_sf + s_wf) / 3
    SDR:     L_sdr = ``sdr_weight`` * mean_i Var_g s_g(t_i, v_i)    (matching pairs of a batch)

Choices where the abstract is silent (the paper builds on X-CLIP's fine-tuned backbone;
here every feature is frozen and cached):

* Granularities are the three the issue names; the word-frame one scores each word
  against the frames aggregated by that word's own attention ("aggregated frame
  representations conditioned on the word's attention weights over frames"), so each
  entry of x^wf is a word's best evidence in the video.
* ISA weighs a similarity vector's entries with a softmax of a linear map of the vector
  itself: the weights see all the similarities at once ("interactive"). Without SR the
  map acts on positions (L = n_frames, or ``max_words`` with padding masked); with SR it
  acts on the k largest entries in descending order, so it learns a soft top-k over
  ranks with k x k instead of L x L weights (SR's "fewer trainable parameters";
  unattended similarities drop out). Rows with fewer than k real entries keep the
  padding masked.
* LSA is the same linear-softmax form over the three granularity scores; without it
  they are averaged. A, U (of LSA) and U (of the query) start at zero, so the untrained
  head averages and attends by cosine.
* The learned part of the attention logit is low rank (``query_rank``): a full
  ``dim x dim`` query map would cost a second word-frame product per pair, as large as
  the first, at evaluation.
* SDR enters training through :meth:`RetrievalHead.train_scores` as the extra term
  ``head.sdr`` (already weighted), added to the loss's total; it never touches scores.
* Every quantity is a function of its own (caption, video) pair; no noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import setting
from tmass.train.heads.base import RetrievalHead, TextFeatures, VideoFeatures, logit_scale_parameter, map_video_blocks
from tmass.train.registry import BaseHeadConfig, HeadSpec

GRANULARITIES = ("sentence-video", "sentence-frame", "word-frame")


@dataclass
class TCMGCConfig(BaseHeadConfig):
    """TC-MGC's settings; ``sr``, ``sdr`` and ``lsa`` are its ablation switches."""

    head: str = setting("tc-mgc", cli=False, help="The registered head's name.")
    attention_temperature: float = setting(0.01, bounds="(0, inf)",
                                           help="Temperature of TC-MGC's language-video attention over frames.")
    sr: bool = setting(True, help="TC-MGC similarity reorganisation: aggregate each similarity vector's top entries, sorted.")
    sr_keep: int = setting(4, bounds="[1, inf)", help="Entries SR keeps per similarity vector (k).")
    sdr: bool = setting(True, help="TC-MGC similarity decorrelation regulariser (a training loss term, head.sdr).")
    sdr_weight: float = setting(1.0, bounds="[0, inf)", help="Weight of the SDR term.")
    lsa: bool = setting(True, help="TC-MGC linear softmax aggregation of the granularities (else their mean).")
    max_words: int = setting(32, bounds="[1, inf)", help="Word tokens ISA weighs without SR (longer captions are cut).")
    query_rank: int = setting(32, bounds="[1, inf)", help="Rank of TC-MGC's learned attention logit term.")


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    return (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).softmax(dim=dim)


class _ISA(nn.Module):
    """Interactive similarity aggregation of x ``[..., L_in]`` (mask ``[..., L_in]``) to
    ``[...]``; with SR on the top ``keep`` entries sorted, else on ``length`` positions."""

    def __init__(self, length: int, keep: int | None):
        super().__init__()
        self.keep = keep
        self.length = keep if keep is not None else length
        self.mix = nn.Linear(self.length, self.length)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:  # SR: the k largest real entries, descending; padding sorts last
            order = x.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True)[..., : self.keep]
            x, mask = x.gather(-1, order), mask.gather(-1, order)
        x, mask = x[..., : self.length], mask[..., : self.length]
        pad = self.length - x.shape[-1]
        if pad > 0:
            x, mask = F.pad(x, (0, pad)), F.pad(mask, (0, pad), value=False)
        x = x.masked_fill(~mask, 0.0)
        return (_masked_softmax(self.mix(x), mask) * x).sum(-1)


class TCMGC(RetrievalHead):
    """Words ``[n_text, n_token, dim]``, sentences ``[n_text, dim]`` and frames
    ``[n_video, n_frames, dim]`` -> scores ``[n_text, n_video]`` (module doc)."""

    def __init__(self, cfg: TCMGCConfig):
        super().__init__(cfg)
        dim = cfg.embed_dim
        self.query_words = nn.Linear(dim, cfg.query_rank, bias=False)  # U
        self.query_frames = nn.Linear(dim, cfg.query_rank, bias=False)  # V
        nn.init.zeros_(self.query_words.weight)
        keep = cfg.sr_keep if cfg.sr else None
        self.isa_frames = _ISA(cfg.num_frames, keep)
        self.isa_words = _ISA(cfg.max_words, keep)
        self.lsa = nn.Linear(len(GRANULARITIES), len(GRANULARITIES))
        nn.init.zeros_(self.lsa.weight)
        nn.init.zeros_(self.lsa.bias)
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def granularities(self, text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        """The three similarities s_sv, s_sf, s_wf of every pair: ``[n_text, n_video, 3]``.

        Computed a block of videos at a time (:func:`~tmass.train.heads.base.map_video_blocks`),
        against every caption: one GEMM per block gives every word (and sentence) against
        every frame as ``[n_vb, n_frames, n_text * n]``, frames in the middle so that the
        softmax over frames runs along contiguous rows. With e the unnormalised softmax
        weights, |f~| = sqrt(e^T G e) / sum e (G the frames' Gram matrix, a batched GEMM),
        so no pooled frame ``[.., dim]`` is formed. ``tests/test_token_heads.py`` holds this
        equal to the equations, written out."""
        tau, max_words = self.cfg.attention_temperature, self.cfg.max_words
        n_text = len(text.embedding)
        s = F.normalize(text.embedding, dim=-1)  # [n_text, dim]
        words = F.normalize(text.tokens[:, :max_words], dim=-1)  # [n_text, n_token, dim]
        word_mask = text.token_mask[:, :max_words]
        n_token = words.shape[1]
        # per text, once: rows (x) and their query terms (U x), [dim | query_rank, n_text * n]
        sentences, sentence_queries = s.T, self.query_words(s).T
        word_rows, word_queries = words.flatten(0, 1).T, self.query_words(words).flatten(0, 1).T
        n_frames = video.frames.shape[1]

        def block(vs: slice) -> torch.Tensor:
            """The videos ``vs`` against every caption: ``[n_vb, n_text, 3]``."""
            f = F.normalize(video.frames[vs], dim=-1)  # [n_vb, n_frames, dim]
            fmask = None if video.frame_mask is None or bool(video.frame_mask[vs].all()) else video.frame_mask[vs]
            gram, keys = f @ f.transpose(1, 2), self.query_frames(f)  # [n_vb, n_frames, n_frames | query_rank]

            def attend(rows: torch.Tensor, queries: torch.Tensor):
                """cos(x, f~) for the rows x: ``[n_vb, n_rows]``, and <x, f_j> ``[n_vb, n_frames, n_rows]``."""
                dots = f @ rows
                logits = torch.baddbmm(dots, keys, queries.expand(len(f), -1, -1), beta=1 / tau, alpha=1 / tau)
                if fmask is not None:
                    logits = logits.masked_fill(~fmask[..., None], float("-inf"))
                e = (logits - logits.amax(1, keepdim=True)).exp_()
                total = e.sum(1)
                norm = ((gram @ e * e).sum(1) / total.square()).clamp_min(1e-12).sqrt()
                return (e * dots).sum(1) / total / norm, dots

            s_sv, x_sf = attend(sentences, sentence_queries)  # [n_vb, n_text], [n_vb, n_frames, n_text]
            x_sf = x_sf.transpose(1, 2)  # [n_vb, n_text, n_frames]
            all_frames = torch.ones((), dtype=torch.bool, device=f.device)
            s_sf = self.isa_frames(x_sf, (all_frames if fmask is None else fmask[:, None, :]).expand_as(x_sf))
            x_wf = attend(word_rows, word_queries)[0].view(len(f), n_text, n_token)  # [n_vb, n_text, n_token]
            s_wf = self.isa_words(x_wf, word_mask[None].expand_as(x_wf))
            return torch.stack((s_sv, s_sf, s_wf), dim=-1)

        return torch.cat(map_video_blocks(block, len(video.frames), n_frames * n_text * n_token)).transpose(0, 1)

    def combine(self, sims: torch.Tensor) -> torch.Tensor:
        """LSA (or the mean) of ``[..., 3]`` -> ``[...]``."""
        if not self.cfg.lsa:
            return sims.mean(-1)
        return (self.lsa(sims).softmax(-1) * sims).sum(-1)

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """s(t, v) ``[n_text, n_video]`` (module doc)."""
        return self.combine(self.granularities(text, video))

    def train_scores(self, text: TextFeatures, video: VideoFeatures) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores ``[B, B]`` and, with SDR, ``sdr``: the variance over granularities of
        the matching pairs' similarities (the diagonal), weighted."""
        sims = self.granularities(text, video)  # [B, B, 3]
        extra = {}
        if self.cfg.sdr and self.cfg.sdr_weight > 0:
            matching = sims.diagonal(dim1=0, dim2=1).T  # [B, 3]
            extra["sdr"] = self.cfg.sdr_weight * matching.var(dim=-1, unbiased=False).mean()
        return self.combine(sims), extra


SPEC = HeadSpec("tc-mgc", "TC-MGC", TCMGCConfig, TCMGC, features={"frames", "word_tokens"},
                summary="text-conditioned multi-grained contrast: word/sentence-conditioned frame attention, "
                        "sentence-video, sentence-frame and word-frame similarities (SR, SDR, LSA switches)")
