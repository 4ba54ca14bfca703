"""The vid2vid sequential generator F (paper eq. 4 and 9), coarse-to-fine over spatial scales.

One :class:`ScaleGenerator` per spatial scale. The coarsest (``scales[0]``) is the global generator: deep
encoders (``n_downsample_G`` downsamplings and residual blocks) and a decoder per branch. Each finer
scale is a local enhancer: one downsampling, the coarser scale's branch features added at the
bottleneck, ``n_blocks_local`` residual blocks, one upsampling. A scale has up to three branches:

- image (hallucination) H: h_t from labels + previous frames;
- flow W / mask M: one shared trunk with two output layers, the flow (pixels) that warps x_{t-1} onto
  t and the soft occlusion mask (the weight of the hallucinated image);
- foreground H_F (fg/bg prior): an encoder-decoder that sees the source frames only.

Only the finest scale runs its output layers; coarser scales contribute their branch features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.models.blocks import decoder, encoder, head, init_weights
from vid2vid.models.inputs import downsample_pyramid, foreground_mask
from vid2vid.models.warp import warp


@dataclass
class GeneratorOutput:
    """One generated frame and the intermediates the losses need (all at the finest resolution)."""

    frame: Tensor  # (N,3,H,W) final x~_t in [-1, 1]
    hallucinated: Tensor  # h~_t; fg branch composited in foreground pixels when the fg prior is on
    flow: Tensor | None  # (N,2,H,W) pixels, x~_t -> x~_{t-1}: warp(x~_{t-1}, flow) lands on frame t
    mask: Tensor | None  # (N,1,H,W) m~_t in [0,1], the weight of the HALLUCINATED image (eq. 4)
    warped: Tensor | None  # warp(x~_{t-1}, flow)
    foreground: Tensor | None  # h~_F, the foreground branch output
    fg_mask: Tensor | None  # (N,1,H,W) 1 in foreground pixels


@dataclass
class BranchFeatures:
    """What one scale hands to the next finer scale: each branch's feature map before its output layer."""

    image: Tensor
    flow: Tensor | None
    foreground: Tensor | None


class ScaleGenerator(nn.Module):
    """One spatial scale: global generator (``n_down > 1`` typically, deep encoder) or local enhancer.

    Attributes absent when a branch is switched off (``flow_*``/``mask_head`` without flow warping,
    ``fg_*`` without the fg/bg prior) so an ablation has no parameters of the removed component.
    """

    def __init__(
        self,
        *,
        source_nc: int,
        prev_nc: int,
        output_nc: int,
        ngf: int,
        n_down: int,
        enc_blocks: int,
        branch_blocks: int,
        with_flow: bool,
        flow_scale: float,
        fg_ngf: int,
        fg_blocks: int,
        norm: str,
    ):
        super().__init__()
        self.flow_scale = flow_scale
        self.label_enc = encoder(source_nc, ngf, n_down, enc_blocks, norm)
        # Same structure, separate weights: previous frames and labels are different modalities.
        self.prev_enc = encoder(prev_nc, ngf, n_down, enc_blocks, norm)
        self.image_branch = decoder(ngf, n_down, branch_blocks, norm)
        self.image_head = head(ngf, output_nc, nn.Tanh())
        self.with_flow = with_flow
        if with_flow:
            # Flow and mask share everything but the output layer (paper §3, "implementation details").
            self.flow_branch = decoder(ngf, n_down, branch_blocks, norm)
            self.flow_head = head(ngf, 2)
            self.mask_head = head(ngf, 1, nn.Sigmoid())
        self.with_fg = fg_ngf > 0
        if self.with_fg:
            self.fg_enc = encoder(source_nc, fg_ngf, n_down, 0, norm)
            self.fg_branch = decoder(fg_ngf, n_down, fg_blocks, norm)
            self.fg_head = head(fg_ngf, output_nc, nn.Tanh())

    def features(self, source: Tensor, prev: Tensor | None, coarse: BranchFeatures | None) -> BranchFeatures:
        """Branch features at this scale. ``prev`` None: no previous frames, so no prev encoder, no flow."""
        x = self.label_enc(source)
        if prev is not None:
            x = x + self.prev_enc(prev)
        image = self.image_branch(x if coarse is None else x + coarse.image)
        flow = None
        if self.with_flow and prev is not None:
            flow = self.flow_branch(x if coarse is None or coarse.flow is None else x + coarse.flow)
        fg = None
        if self.with_fg:
            f = self.fg_enc(source)
            fg = self.fg_branch(f if coarse is None or coarse.foreground is None else f + coarse.foreground)
        return BranchFeatures(image=image, flow=flow, foreground=fg)

    def outputs(
        self, feats: BranchFeatures, prev_last: Tensor | None, fg_mask: Tensor | None
    ) -> GeneratorOutput:
        """Output layers and composition at this scale's resolution."""
        h = self.image_head(feats.image)
        frame, flow, mask, warped = h, None, None, None
        if feats.flow is not None:
            if prev_last is None:
                raise ValueError("ScaleGenerator.outputs: flow features given but no previous frame to warp")
            flow = self.flow_head(feats.flow) * self.flow_scale
            mask = self.mask_head(feats.flow)
            warped = warp(prev_last, flow)
            frame = (1 - mask) * warped + mask * h  # eq. 4; mask weights the hallucinated image
        hallucinated, foreground = h, None
        if feats.foreground is not None:
            if fg_mask is None:
                raise ValueError("ScaleGenerator.outputs: the fg/bg prior needs the foreground mask")
            foreground = self.fg_head(feats.foreground)
            fg_mask = fg_mask.to(frame.dtype)
            # Paper eq. 9 puts h_F inside the hallucination term: (1-m)*w + m*((1-m_B)*h_F + m_B*h_B),
            # so foreground pixels would still be partly warped. Like the reference we let H_F own
            # foreground pixels outright. For a binary m_F = 1 - m_B this IS eq. 9 with the occlusion
            # mask replaced by max(m, m_F): foreground objects move too much to be warped reliably.
            frame = fg_mask * foreground + (1 - fg_mask) * frame
            hallucinated = fg_mask * foreground + (1 - fg_mask) * h
        return GeneratorOutput(
            frame=frame,
            hallucinated=hallucinated,
            flow=flow,
            mask=mask,
            warped=warped,
            foreground=foreground,
            fg_mask=fg_mask if self.with_fg else None,
        )


def _check_config(cfg: ModelConfig) -> None:
    div = 2 ** (cfg.n_scales_spatial - 1)
    if not 1 <= cfg.n_scales_spatial <= 3:
        raise ValueError(f"model.n_scales_spatial: must be 1, 2 or 3, got {cfg.n_scales_spatial}")
    if cfg.ngf % div or cfg.ngf // div < 1:
        raise ValueError(f"model.ngf={cfg.ngf} must be divisible by 2**(n_scales_spatial-1)={div}")
    if cfg.fg_bg_prior:
        if cfg.label_nc <= 0:
            raise ValueError("model.fg_bg_prior: needs semantic labels (model.label_nc > 0)")
        bad = [i for i in cfg.fg_labels if not 0 <= i < cfg.label_nc]
        if bad:
            raise ValueError(f"model.fg_labels: ids {bad} are outside [0, label_nc={cfg.label_nc})")


class Vid2VidGenerator(nn.Module):
    """x~_t = F(x~_{t-L}^{t-1}, s_{t-L}^t), coarse to fine. See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        per_frame = cfg.label_channels + (cfg.feat_num if cfg.use_features else 0)
        source_nc = cfg.n_frames_G * per_frame
        prev_nc = cfg.prev_frames * cfg.output_nc
        fg_ngf = (cfg.ngf // 2 if cfg.n_downsample_G > 2 else cfg.ngf) if cfg.fg_bg_prior else 0
        if fg_ngf and fg_ngf % 2 ** (cfg.n_scales_spatial - 1):
            raise ValueError(f"foreground branch width {fg_ngf} (from model.ngf) is not divisible by "
                             f"2**(n_scales_spatial-1)")
        scales = []
        for s in range(cfg.n_scales_spatial):
            common = dict(
                source_nc=source_nc,
                prev_nc=prev_nc,
                output_nc=cfg.output_nc,
                ngf=cfg.ngf // 2**s,
                with_flow=cfg.flow_warping,
                flow_scale=cfg.flow_multiplier * 2**s,  # pixel units double per finer octave
                fg_ngf=fg_ngf // 2**s,
                norm=cfg.norm,
            )
            if s == 0:
                n_enc = cfg.n_blocks - cfg.n_blocks // 2
                scale = ScaleGenerator(**common, n_down=cfg.n_downsample_G, enc_blocks=n_enc,
                                       branch_blocks=cfg.n_blocks // 2, fg_blocks=cfg.n_blocks)
            else:
                # A local enhancer's bottleneck (2 * ngf_s channels at half its resolution) has the shape
                # of the coarser scale's branch features, which are added there.
                scale = ScaleGenerator(**common, n_down=1, enc_blocks=0, branch_blocks=cfg.n_blocks_local,
                                       fg_blocks=cfg.n_blocks_local)
            scales.append(scale)
        self.scales = nn.ModuleList(scales)
        init_weights(self)
        for scale in self.scales:
            if scale.with_flow:
                # Start from a zero flow ("copy the previous frame") instead of the reference's random
                # head, whose x20*2**s multiplier makes initial flows of tens of pixels. The head's
                # weights still get gradients from the first step.
                nn.init.zeros_(scale.flow_head[-1].weight)
                nn.init.zeros_(scale.flow_head[-1].bias)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (every downsampling must be undone exactly)."""
        return 2 ** (self.cfg.n_downsample_G + self.cfg.n_scales_spatial - 1)

    def freeze_coarse_scales(self, frozen: bool) -> None:
        """Freeze (or unfreeze) every scale but the finest, for the spatially progressive schedule."""
        for scale in self.scales[:-1]:
            scale.requires_grad_(not frozen)

    def _check_inputs(self, source, prev_frames, label_ids, features) -> None:
        cfg = self.cfg
        if source.dim() != 5 or source.shape[1] != cfg.n_frames_G or source.shape[2] != cfg.label_channels:
            raise ValueError(
                f"Vid2VidGenerator: source must be (N, n_frames_G={cfg.n_frames_G}, "
                f"label_channels={cfg.label_channels}, H, W), got {tuple(source.shape)}"
            )
        n, _, _, h, w = source.shape
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(
                f"Vid2VidGenerator: frame size {w}x{h} (WxH) must be a multiple of {m} = "
                f"2**(n_downsample_G + n_scales_spatial - 1)"
            )
        if prev_frames is not None and prev_frames.shape != (n, cfg.prev_frames, cfg.output_nc, h, w):
            raise ValueError(
                f"Vid2VidGenerator: prev_frames must be (N, L={cfg.prev_frames}, {cfg.output_nc}, H, W) = "
                f"{(n, cfg.prev_frames, cfg.output_nc, h, w)}, got {tuple(prev_frames.shape)}"
            )
        if cfg.use_features:
            want = (n, cfg.n_frames_G, cfg.feat_num, h, w)
            if features is None or features.shape != want:
                got = None if features is None else tuple(features.shape)
                raise ValueError(
                    f"Vid2VidGenerator: model.use_features needs features of shape {want}, got {got}"
                )
        elif features is not None:
            raise ValueError("Vid2VidGenerator: features given but model.use_features is off")
        if cfg.fg_bg_prior and (label_ids is None or label_ids.shape != (n, h, w)):
            got = None if label_ids is None else tuple(label_ids.shape)
            raise ValueError(
                f"Vid2VidGenerator: the fg/bg prior needs the current frame's label_ids {(n, h, w)}, "
                f"got {got}"
            )

    def forward(
        self,
        source: Tensor,
        prev_frames: Tensor | None,
        label_ids: Tensor | None = None,
        features: Tensor | None = None,
    ) -> GeneratorOutput:
        """Generate frame t.

        source (N, n_frames_G, label_channels, H, W): encoded source frames t-L..t.
        prev_frames (N, L, 3, H, W): generated frames t-L..t-1, or None for the first frames (no
        warping; the frame is the hallucinated image).
        label_ids (N, H, W): ids of frame t, for the foreground mask (fg/bg prior only).
        features (N, n_frames_G, feat_num, H, W): instance-pooled encoder features (use_features only).
        """
        self._check_inputs(source, prev_frames, label_ids, features)
        if features is not None:
            source = torch.cat([source, features.to(source.dtype)], dim=2)
        n_scales = len(self.scales)
        sources = downsample_pyramid(source.flatten(1, 2), n_scales)
        prevs = downsample_pyramid(prev_frames.flatten(1, 2), n_scales) if prev_frames is not None else None
        feats = None
        for s, scale in enumerate(self.scales):
            level = n_scales - 1 - s  # pyramids are finest first; scales coarsest first
            feats = scale.features(sources[level], None if prevs is None else prevs[level], feats)
        fg_mask = foreground_mask(label_ids, self.cfg.fg_labels) if self.cfg.fg_bg_prior else None
        prev_last = prev_frames[:, -1] if prev_frames is not None else None
        return self.scales[-1].outputs(feats, prev_last, fg_mask)
