"""The refiner: a torchvision ResNet (or a mobile-class backbone) that sees the image and the input pose, and a head
that brings its features back to stride 4.

Glossary: N persons, K = 17 joints, (H, W) the input crop, (h, w) = (H/4, W/4) the output heatmaps.
Coordinates are (x, y) in pixels with pixel centres at integers; output pixel i covers input pixels
4i .. 4i+3, so its centre is at 4i + 1.5 in the input.

As in PoseFix: the stem takes RGB + K input-pose heatmaps, three 4×4 transposed convolutions bring
stride 32 back to stride 4, a 1×1 convolution gives K heatmaps, and soft-argmax gives coordinates
with gradients. Three changes:

- The logits are the head's output plus log(input-pose heatmap pooled to the output grid + 1e-6),
  and the last convolution starts at zero: an untrained refiner returns its input pose, and training
  only learns corrections. (A refiner that must first learn to copy its input is far worse than no
  refiner when data or training are short.)
- A confidence head: for each joint, the probability that the refined joint lies within KS >= 0.5
  of the truth, read from the head's features under the joint's heatmap and learned with a
  binary cross-entropy.
- An input-confidence head: for each joint, the probability that the *input* joint lies within
  KS >= 0.5 of the truth, read from the head's features under the input joint's pooled heatmap and
  learned the same way. Its weights start at zero and its bias at ``INPUT_CONFIDENCE_INIT``, so an
  untrained model trusts every input joint more than its own correction and returns the input exactly.
  The refiner's default output, "choice" (:class:`posefix.refiner.Refiner`, :mod:`posefix.choice`), gives
  per joint the input or the refined one: the refined one where the checkpoint's fitted rule
  (``posefix fit-choice``) takes it, or, without a fitted rule, where the refined confidence exceeds this head's
  estimate by more than the choice margin, which then defaults to 1.0 and so keeps every input joint.

A second head (``head = "offset"``), after G-RMI (Papandreou et al., CVPR 2017): the same logits are a
per-pixel disk classifier (is this output pixel within ``offset_radius`` of the joint?), a 1×1 convolution
gives each pixel a 2-D offset to the joint, and a joint is decoded as its heatmap's peak plus the offset
there. Its offsets start at zero, so an untrained offset head returns the input joint's output pixel.

Mobile-class backbones (``MOBILE``: MobileNetV3, ShuffleNetV2, RegNetX) take the same place: their stem
convolution gets the K heatmap channels as the ResNet stem does, their last 1×1 expansion is left out, and the
head is three light stages (×2 upsampling, depthwise 3×3, pointwise 1×1) of ``head_channels`` instead of
4×4 transposed convolutions. Everything after the head is the same.

Given the input pose as keypoints, the K heatmaps are never rendered at full resolution: the stem
convolution is linear in them and each is a separable Gaussian, so their part of the stem's output
is computed at the stem's stride from 1-D factors (about a seventh of the arithmetic of convolving
the rendered maps: 0.21 instead of 1.47 GMAC per person at 384×288), and so is the pooled prior.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import codec
from .codec import soft_argmax
from .errors import InputError
from .keypoints import NUM_KEYPOINTS

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Mobile-class torchvision backbones: their stem convolution takes the input pose as the ResNet stem does, their
# last 1×1 expansion (made for a classifier's pooling) is left out, and a light head brings stride 32 back to 4.
MOBILE = ("mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0", "regnet_x_400mf")
BACKBONES = RESNETS + MOBILE
HEADS = ("soft_argmax", "offset")
STRIDE = 4
PRIOR_EPS = 1e-6
# Initial logit of the input-confidence head (sigmoid 0.98): above any refined confidence an untrained head gives.
INPUT_CONFIDENCE_INIT = 4.0
# ImageNet statistics of the RGB channels, for images scaled to [0, 1].
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)


MAX_INPUT_SIDE = 2048  # crop side, pixels (the published models use 384×288)
MAX_HEAD_CHANNELS = 4096  # the deconvolution head's width (default 256)


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # one of BACKBONES
    input_size: tuple[int, int] = (256, 192)  # (H, W) of the crop; multiples of 32
    sigma: float = 7.0  # σ of the input-pose Gaussians, in input pixels (reference: 7 at 256×192, 9 at 384×288)
    num_keypoints: int = NUM_KEYPOINTS
    head_channels: int = 256  # width of the deconvolution head
    input_prior: bool = True  # add log(pooled input heatmap) to the logits
    head: str = "soft_argmax"  # one of HEADS: soft-argmax of the heatmap, or G-RMI's disk heatmap + offsets
    offset_radius: float = 2.0  # the "offset" head's disk radius, in output pixels (4 input pixels each)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise InputError("model.backbone", f"must be one of {list(BACKBONES)}, got {self.backbone!r}")
        size = self.input_size
        if not (isinstance(size, tuple) and len(size) == 2 and all(_int(v, 32, MAX_INPUT_SIDE) and v % 32 == 0
                                                                   for v in size)):
            raise InputError("model.input_size", f"(H, W) must be multiples of 32 from 32 to {MAX_INPUT_SIDE}, "
                             f"got {size!r}")
        if not (isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool)
                and 0 < self.sigma < math.inf):
            raise InputError("model.sigma", f"must be a positive number, got {self.sigma!r}")
        if not _int(self.num_keypoints, NUM_KEYPOINTS, NUM_KEYPOINTS):
            raise InputError("model.num_keypoints",
                             f"must be {NUM_KEYPOINTS} (COCO's joints), got {self.num_keypoints!r}")
        if not _int(self.head_channels, 1, MAX_HEAD_CHANNELS):
            raise InputError("model.head_channels", f"must be an integer from 1 to {MAX_HEAD_CHANNELS}, "
                             f"got {self.head_channels!r}")
        if not isinstance(self.input_prior, bool):
            raise InputError("model.input_prior", f"must be true or false, got {self.input_prior!r}")
        if self.head not in HEADS:
            raise InputError("model.head", f"must be one of {list(HEADS)}, got {self.head!r}")
        if not (isinstance(self.offset_radius, (int, float)) and not isinstance(self.offset_radius, bool)
                and 1 <= self.offset_radius <= 64):
            raise InputError("model.offset_radius", f"must be a number from 1 to 64 (output pixels), "
                             f"got {self.offset_radius!r}")


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _light_up(cin: int, cout: int) -> nn.Sequential:
    """The mobile backbones' head stage: ×2 nearest upsampling, a depthwise 3×3 and a pointwise convolution
    (cin·9 + cin·cout multiply-adds per output pixel, against cin·cout·4 for a 4×4 stride-2 deconvolution)."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                         nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _torchvision_parts(net: nn.Module, name: str) -> tuple[nn.Sequential, list[nn.Module]]:
    """A torchvision classifier's stem (conv, norm, activation) and the modules after it up to stride 32
    (without a classifier's last 1×1 expansion and pooling)."""
    if name in RESNETS:
        return (nn.Sequential(net.conv1, net.bn1, net.relu),
                [net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4])
    if name.startswith("mobilenet_v3"):
        return net.features[0], list(net.features[1:-1])
    if name.startswith("shufflenet"):
        return net.conv1, [net.maxpool, net.stage2, net.stage3, net.stage4]
    if name.startswith("regnet"):
        return net.stem, [net.trunk_output]
    raise ValueError(f"no parts for backbone {name!r}")


class PoseFixNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.num_keypoints
        net = getattr(torchvision.models, cfg.backbone)(weights=None)
        first, rest = _torchvision_parts(net, cfg.backbone)
        conv = first[0]
        stem = nn.Conv2d(3 + k, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, bias=False)
        with torch.no_grad():
            stem.weight[:, :3] = conv.weight
            nn.init.normal_(stem.weight[:, 3:], std=1e-3)
        self.backbone = nn.Sequential(stem, first[1], first[2], *rest)
        c = cfg.head_channels
        if cfg.backbone in RESNETS:
            feat = net.fc.in_features
            self.head = nn.Sequential(_deconv(feat, c), _deconv(c, c), _deconv(c, c))
        else:
            with torch.no_grad():
                feat = self.backbone[1:](torch.zeros(1, conv.out_channels, 32, 32)).shape[1]
            self.head = nn.Sequential(_light_up(feat, c), _light_up(c, c), _light_up(c, c))
            for m in self.backbone.modules():  # torchvision's MobileNetV3 keeps 0.01 (TF's); short runs need more
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 0.1
        self.final = nn.Conv2d(c, k, kernel_size=1)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        if cfg.head == "offset":  # (x, y) offsets from each output pixel to the joint, in output pixels
            self.offset = nn.Conv2d(c, 2 * k, kernel_size=1)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
        self.confidence = nn.Conv2d(c, k, kernel_size=1)
        nn.init.normal_(self.confidence.weight, std=1e-3)
        nn.init.zeros_(self.confidence.bias)
        self.input_confidence = nn.Conv2d(c, k, kernel_size=1)
        nn.init.zeros_(self.input_confidence.weight)
        nn.init.constant_(self.input_confidence.bias, INPUT_CONFIDENCE_INIT)
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)
        self.fused_stem = True  # from keypoints: the heatmap channels' stem convolution without rendering them
        self.merged_outputs: OutputConvs | None = None  # the 1×1 output convolutions as one (merge_output_convs)

    def forward(self, image: torch.Tensor, heatmaps: torch.Tensor | None = None, *,
                keypoints: torch.Tensor | None = None) -> dict:
        """image (N, 3, H, W) RGB in [0, 1], and the input pose as one of
        ``heatmaps`` (N, K, H, W): input-pose Gaussians of peak 1 (σ = cfg.sigma), or
        ``keypoints`` (N, K, 3) = (x, y, v) in crop pixels, a joint present where v > 0 and x, y are finite.

        From keypoints, with ``self.fused_stem`` (the default), the heatmaps are never rendered: their
        share of the stem convolution and the pooled prior are computed from the Gaussians' 1-D factors
        (:func:`codec.heatmap_conv2d`, :func:`codec.pooled_heatmaps`), equal to the rendered path within
        float rounding. With ``fused_stem = False`` the keypoints are rendered and take the plain path.

        Returns ``logits`` (N, K, h, w), ``prob`` (N, K, h, w), ``coords`` (N, K, 2) in input pixels,
        ``confidence_logit`` (N, K) (sigmoid: probability of KS >= 0.5 to the truth),
        ``input_confidence_logit`` (N, K) (sigmoid: probability that the input joint is within KS >= 0.5).
        """
        if (heatmaps is None) == (keypoints is None):
            raise ValueError("give the input pose as exactly one of heatmaps or keypoints")
        cfg = self.cfg
        rgb = (image - self.rgb_mean) / self.rgb_std
        if keypoints is not None and self.fused_stem:
            stem = self.backbone[0]
            k = cfg.num_keypoints
            x = F.conv2d(rgb, stem.weight[:, :3], stem.bias, stride=stem.stride,
                         padding=stem.padding)  # (N, 64, H/2, W/2); a bias once BatchNorm is folded in
            x = x + codec.heatmap_conv2d(keypoints, cfg.input_size, cfg.sigma, stem.weight[:, 3:3 + k],
                                         stride=stem.stride[0], padding=stem.padding[0]).to(x.dtype)
            f = self.head(self.backbone[1:](x))  # (N, c, h, w)
            pooled = codec.pooled_heatmaps(keypoints, cfg.input_size, cfg.sigma, STRIDE)  # (N, K, h, w)
        else:
            if heatmaps is None:
                heatmaps = codec.render_heatmaps(keypoints, cfg.input_size, cfg.sigma, dtype=image.dtype)
            x = torch.cat([rgb, heatmaps.to(rgb.dtype)], dim=1)  # (N, 3+K, H, W)
            f = self.head(self.backbone(x))  # (N, c, h, w)
            pooled = F.avg_pool2d(heatmaps.float(), STRIDE)  # (N, K, h, w)
        if self.merged_outputs is not None:
            logits, conf_map, input_map, *offsets = self.merged_outputs(f)
        else:
            logits, conf_map = self.final(f), self.confidence(f)
            input_map = F.conv2d(f.float(), self.input_confidence.weight.float())
            offsets = [self.offset(f)] if cfg.head == "offset" else []
        if cfg.input_prior:
            logits = logits.float() + torch.log(pooled + PRIOR_EPS)
        coords, prob = soft_argmax(logits)
        extra = {}
        if cfg.head == "offset":
            offsets = offsets[0].float().unflatten(1, (cfg.num_keypoints, 2))  # (N, K, 2, h, w)
            coords = peak_plus_offset(logits, offsets)
            extra["offsets"] = offsets
        conf_map = conf_map.float()  # (N, K, h, w)
        confidence_logit = (conf_map * prob.detach()).sum(dim=(2, 3))
        # The input joint's features: under its pooled heatmap, normalised to sum 1 (0 for an absent joint:
        # the bias alone).
        pooled = pooled.float()
        where = pooled / pooled.sum(dim=(2, 3), keepdim=True).clamp(min=PRIOR_EPS)
        input_confidence_logit = ((input_map.float() * where).sum(dim=(2, 3))
                                  + self.input_confidence.bias.float())
        return {"logits": logits, "prob": prob, "coords": coords * STRIDE + (STRIDE - 1) / 2,
                "confidence_logit": confidence_logit, "input_confidence_logit": input_confidence_logit, **extra}


def peak_plus_offset(logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """G-RMI's decoding: each heatmap's peak pixel (first of equals) plus the offset predicted there.

    logits (N, K, h, w); offsets (N, K, 2, h, w) = (dx, dy) in output pixels. Returns (N, K, 2) (x, y) in
    output pixels, differentiable with respect to the offsets (the peak's position is not)."""
    n, k, _, w = logits.shape
    index = logits.flatten(2).argmax(-1)  # (N, K)
    peak = torch.stack([index % w, torch.div(index, w, rounding_mode="floor")], -1).to(offsets.dtype)
    at_peak = offsets.flatten(3).gather(3, index[:, :, None, None].expand(n, k, 2, 1)).squeeze(-1)  # (N, K, 2)
    return peak + at_peak


def fold_batchnorm(model: PoseFixNet) -> PoseFixNet:
    """A copy of ``model`` for inference, every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a per-channel affine map, so it folds into the preceding convolution's weights
    and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``; transposed for the head): the same function up to
    float rounding, without a memory pass over every activation. The stem's fold covers its RGB and heatmap
    channels alike, so the fused stem stays exact. The copy is in eval mode and is for inference only; the
    model given is left as it is.
    """
    from copy import deepcopy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent, conv: str, bn: str, transpose: bool = False) -> None:
        if isinstance(getattr(parent, bn), nn.BatchNorm2d):  # (an already folded model is left as it is)
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn), transpose))
            setattr(parent, bn, nn.Identity())

    folded = deepcopy(model).eval()
    for module in list(folded.modules()):
        # A ResNet block's convolutions and norms by name (conv1/bn1, ...); everything else (the stem, ResNet's
        # downsampling, torchvision's Conv2dNormActivation, ShuffleNet's branches, both heads) is a
        # convolution followed by its BatchNorm in a Sequential.
        for i in (1, 2, 3):
            if isinstance(getattr(module, f"conv{i}", None), nn.Conv2d):
                fold(module, f"conv{i}", f"bn{i}")
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in itertools.pairwise(names):
                conv = module._modules[a]
                if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(module._modules[b], nn.BatchNorm2d):
                    fold(module, a, b, transpose=isinstance(conv, nn.ConvTranspose2d))
    return folded


class OutputConvs(nn.Module):
    """The head's 1×1 output convolutions (heatmap logits, confidence, input confidence without its bias, and
    offsets where the head has them) as one convolution whose output is split: the same function, one pass
    over the features instead of three or four (for exported graphs, where each pass also converts the
    features' layout)."""

    def __init__(self, model: PoseFixNet):
        super().__init__()
        convs = [model.final, model.confidence, model.input_confidence]
        convs += [model.offset] if model.cfg.head == "offset" else []
        biases = [c.bias for c in convs]
        biases[2] = torch.zeros_like(biases[2])  # the input confidence's bias is added after its pooling
        self.sizes = [c.out_channels for c in convs]
        self.conv = nn.Conv2d(convs[0].in_channels, sum(self.sizes), kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([c.weight for c in convs]))
            self.conv.bias.copy_(torch.cat(biases))

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        return list(self.conv(f).split(self.sizes, dim=1))


def merge_output_convs(model: PoseFixNet) -> PoseFixNet:
    """``model`` (for inference) with its output convolutions merged into one (:class:`OutputConvs`)."""
    model.merged_outputs = OutputConvs(model)
    return model


class SubpixelDeconv(nn.Module):
    """A 4×4, stride-2, padding-1 transposed convolution as a 3×3 convolution to 4× the channels and a 2×
    pixel shuffle: the same function (each output phase (a, b) reads the input at offsets {-1, 0} or {0, 1}),
    made of operators an int8 runtime quantises (ONNX Runtime's CPU provider has no int8 ConvTranspose)."""

    def __init__(self, deconv: nn.ConvTranspose2d):
        super().__init__()
        if not (deconv.kernel_size == (4, 4) and deconv.stride == (2, 2) and deconv.padding == (1, 1)
                and deconv.groups == 1 and deconv.dilation == (1, 1) and deconv.output_padding == (0, 0)):
            raise ValueError("only a 4×4 stride-2 padding-1 transposed convolution has this form")
        w = deconv.weight.detach()  # (cin, cout, 4, 4)
        cin, cout = w.shape[:2]
        k = w.new_zeros(cout, 2, 2, cin, 3, 3)  # (o, a, b, c, u, v)
        for a in (0, 1):
            for u in range(3):
                ky = a + 3 - 2 * u
                if not 0 <= ky < 4:
                    continue
                for b in (0, 1):
                    for v in range(3):
                        kx = b + 3 - 2 * v
                        if 0 <= kx < 4:
                            k[:, a, b, :, u, v] = w[:, :, ky, kx].T
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=deconv.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.conv.weight.copy_(k.reshape(4 * cout, cin, 3, 3))
            if deconv.bias is not None:
                self.conv.bias.copy_(deconv.bias.detach().repeat_interleave(4))
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def subpixel_head(model: PoseFixNet) -> PoseFixNet:
    """``model`` (folded, for inference) with every transposed convolution of its head as a
    :class:`SubpixelDeconv`: the same function, 2.25× the multiply-adds, every one of them int8-quantisable."""
    for module in model.head.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ConvTranspose2d):
                setattr(module, name, SubpixelDeconv(child))
    return model


def load_pretrained(model: PoseFixNet, pretrained: str | None) -> str:
    """Copy ImageNet weights into the backbone (RGB channels of the stem); returns what was loaded.

    ``pretrained``: "none" (or None) for none; "imagenet" for torchvision's weights, which must already
    be in torch's cache (posefix never downloads); or the path of a state dict of the torchvision classifier
    named by ``model.backbone``
    (.pth, loaded with weights_only=True, or .safetensors).
    """
    if pretrained in (None, "none"):
        return "none"
    name = model.cfg.backbone
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.exists():
            raise InputError("model.pretrained", f"ImageNet weights for {name} are not in {cached.parent}; "
                             "put the file there, pass its path, or use 'none'")
        path = cached
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise InputError("model.pretrained", f"{pretrained!r} is neither 'none', 'imagenet' nor a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = getattr(torchvision.models, name)(weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise InputError("model.pretrained", f"{path} is not a {name} state dict: {str(e).splitlines()[0]}") from None
    first, rest = _torchvision_parts(net, name)
    with torch.no_grad():
        model.backbone[0].weight[:, :3] = first[0].weight
        for ours, theirs in zip(list(model.backbone)[1:], [first[1], first[2], *rest]):
            ours.load_state_dict(theirs.state_dict())
    return str(path)
