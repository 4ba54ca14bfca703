"""The vid2vid objective (eq. 5 plus feature matching and VGG terms), split by where it is computed.

- :meth:`Objective.generator_local`: terms that need only G's outputs and the real clip (flow loss
  eq. 8, generated-frame warp loss, mask regulariser, VGG). A generator rank computes them.
- :meth:`Objective.generator_adversarial`: GAN and feature-matching terms of D_I and every D_V scale,
  from a :class:`Judgement`. In the split placement a discriminator rank computes them and returns the
  gradient with respect to the fake frames.
- :meth:`Objective.discriminator`: the discriminators' own losses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.models.adversarial import Judgement
from vid2vid.models.discriminators import DiscriminatorOutput, face_num_D
from vid2vid.models.losses import FeatureMatchingLoss, FlowLoss, GANLoss, MaskLoss, TemporalWarpLoss, VGGLoss
from vid2vid.models.vgg import PUBLIC_WEIGHTS, load_vgg19
from vid2vid.models.vid2vid import SequenceOutput
from vid2vid.weights import resolve

log = logging.getLogger(__name__)


@dataclass
class LossTerms:
    """Named loss terms; only the terms of components that exist in this model are present."""

    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return torch.stack(list(self.terms.values())).sum()

    def scalars(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}": float(v.detach()) for k, v in self.terms.items()}
        if self.terms:
            out[f"{prefix}total"] = float(self.total.detach())
        return out

    def __add__(self, other: LossTerms) -> LossTerms:
        return LossTerms({**self.terms, **other.terms})


def build_vgg_loss(cfg: ModelConfig) -> VGGLoss | None:
    """The VGG perceptual loss from ``cfg.vgg_weights``, or None (with a warning saying why) when no
    weights are set or ``auto`` cannot download them (no network). A downloaded file whose checksum
    does not match is an error, never a silent fallback.

    Random VGG weights would make the "perceptual" loss a random-feature loss, so there is no
    fallback: without a weights file the term is off, and the log says so and how to turn it on.
    """
    if not cfg.vgg_weights:
        log.warning("model.vgg_weights is not set: VGG perceptual loss (lambda_vgg=%g) is OFF. Set "
                    "model.vgg_weights=auto (downloads torchvision's %s once) or model.vgg_weights=/path/to/%s.",
                    cfg.lambda_vgg, PUBLIC_WEIGHTS, PUBLIC_WEIGHTS)
        return None
    try:
        path = resolve(cfg.vgg_weights, "vgg19", "model.vgg_weights")
    except OSError as err:  # no network, a dead mirror: the run goes on without the term, and says so
        log.warning("VGG perceptual loss is OFF: %s", err)
        return None
    return VGGLoss(load_vgg19(path), weight=cfg.lambda_vgg)


class Objective(nn.Module):
    """All loss modules of a model built from one ModelConfig; absent components have no terms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gan = GANLoss(cfg.gan_mode)
        self.feature_matching = FeatureMatchingLoss(cfg.lambda_feat, cfg.n_layers_D, cfg.num_D)
        self.vgg = build_vgg_loss(cfg)
        self.flow = FlowLoss(cfg.lambda_F) if cfg.flow_warping else None
        self.temporal_warp = TemporalWarpLoss(cfg.lambda_T) if cfg.flow_warping else None
        self.mask = MaskLoss(cfg.lambda_mask) if cfg.flow_warping and cfg.lambda_mask > 0 else None
        self.face_feature_matching = (FeatureMatchingLoss(cfg.lambda_feat, cfg.n_layers_D, face_num_D(cfg))
                                      if cfg.face_discriminator else None)

    def generator_local(self, seq: SequenceOutput, real: Tensor, real_flows: Tensor,
                        confidence: Tensor) -> LossTerms:
        """Terms that need no discriminator. Flow terms average over frames 1..T-1 (eq. 8)."""
        terms: dict[str, Tensor] = {}
        T = seq.frames.shape[1]
        if self.vgg is not None:
            fake = seq.frames.flatten(0, 1)
            terms["vgg"] = self.vgg(fake, real[:, :T].flatten(0, 1))
            if self.cfg.flow_warping:
                terms["vgg_raw"] = self.vgg(seq.hallucinated.flatten(0, 1), real[:, :T].flatten(0, 1))
        if T < 2 or self.flow is None:
            return LossTerms(terms)
        pairs = range(1, T)
        flow_terms = [self.flow(seq.flows[:, t], real_flows[:, t], real[:, t - 1], real[:, t], confidence[:, t])
                      for t in pairs]
        terms["flow_endpoint"] = torch.stack([f.endpoint for f in flow_terms]).mean()
        terms["flow_warp"] = torch.stack([f.warp for f in flow_terms]).mean()
        terms["temporal_warp"] = torch.stack([
            self.temporal_warp(seq.frames[:, t], seq.frames[:, t - 1], real_flows[:, t], confidence[:, t])
            for t in pairs]).mean()
        if self.mask is not None:
            terms["mask"] = torch.stack([self.mask(seq.masks[:, t], confidence[:, t]) for t in pairs]).mean()
        return LossTerms(terms)

    def generator_adversarial(self, j: Judgement) -> LossTerms:
        terms = {
            "image_gan": self.gan(j.image_fake, True, for_discriminator=False),
            "image_feat": self.feature_matching(j.image_fake, j.image_real),
        }
        if j.image_raw_fake is not None:
            terms["image_raw_gan"] = self.gan(j.image_raw_fake, True, for_discriminator=False)
            terms["image_raw_feat"] = self.feature_matching(j.image_raw_fake, j.image_real)
        for s, (real, fake) in enumerate(zip(j.video_real, j.video_fake, strict=True)):
            if fake is not None:
                terms[f"video{s}_gan"] = self.gan(fake, True, for_discriminator=False)
                terms[f"video{s}_feat"] = self.feature_matching(fake, real)
        if j.face_fake is not None:
            w = j.face_weight
            terms["face_gan"] = w * self.cfg.lambda_face * self.gan(j.face_fake, True, for_discriminator=False)
            terms["face_feat"] = w * self.face_feature_matching(j.face_fake, j.face_real)
        return LossTerms(terms)

    def discriminator(self, j: Judgement) -> LossTerms:
        def pair(real: DiscriminatorOutput, fake: DiscriminatorOutput) -> Tensor:
            return 0.5 * (self.gan(real, True, for_discriminator=True) + self.gan(fake, False, for_discriminator=True))

        terms = {"image": pair(j.image_real, j.image_fake)}
        if j.image_raw_fake is not None:
            terms["image_raw"] = pair(j.image_real, j.image_raw_fake)
        for s, (real, fake) in enumerate(zip(j.video_real, j.video_fake, strict=True)):
            if fake is not None:
                terms[f"video{s}"] = pair(real, fake)
        if j.face_fake is not None:
            terms["face"] = j.face_weight * pair(j.face_real, j.face_fake)
        return LossTerms(terms)
