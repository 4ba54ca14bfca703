"""Small convolutional building blocks shared by the generator and the feature encoder."""

from __future__ import annotations

from torch import Tensor, nn

NORMS = ("instance", "batch", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``instance`` (affine), ``batch`` or ``none``.

    Instance norm is the default: the reference used train-mode BatchNorm at batch size 1 and never
    called ``.eval()``, which is per-frame normalisation with an affine, i.e. instance norm in disguise.
    Saying so explicitly keeps train and test behaviour identical at any batch size.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm: unknown normalisation {kind!r}; expected one of {list(NORMS)}")


def _conv_bias(norm: str) -> bool:
    # A bias right before an affine norm is cancelled by the mean subtraction.
    return norm == "none"


def stem(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    """ReflectionPad 3 + 7x7 conv + norm + ReLU: the full-resolution entry of every encoder."""
    return nn.Sequential(
        nn.ReflectionPad2d(3),
        nn.Conv2d(in_ch, out_ch, 7, bias=_conv_bias(norm)),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


def down(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    """3x3 stride-2 conv: halves H and W (ceil)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=_conv_bias(norm)),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


def up(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    """3x3 stride-2 transposed conv: exactly doubles H and W."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=_conv_bias(norm)),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


def head(in_ch: int, out_ch: int, activation: nn.Module | None = None) -> nn.Sequential:
    """ReflectionPad 3 + 7x7 conv (+ activation): the output layer of an image, flow or mask branch."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, out_ch, 7)]
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


class ResnetBlock(nn.Module):
    """x + [reflpad, conv3, norm, ReLU, reflpad, conv3, norm](x)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        bias = _conv_bias(norm)
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            norm_layer(norm, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def encoder(in_ch: int, ngf: int, n_down: int, n_blocks: int, norm: str) -> nn.Sequential:
    """stem -> n_down stride-2 convs doubling channels -> n_blocks resblocks (ends at ngf * 2**n_down)."""
    layers: list[nn.Module] = [stem(in_ch, ngf, norm)]
    for i in range(n_down):
        layers.append(down(ngf * 2**i, ngf * 2 ** (i + 1), norm))
    layers += [ResnetBlock(ngf * 2**n_down, norm) for _ in range(n_blocks)]
    return nn.Sequential(*layers)


def decoder(ngf: int, n_up: int, n_blocks: int, norm: str) -> nn.Sequential:
    """n_blocks resblocks at ngf * 2**n_up channels -> n_up transposed convs halving channels -> ngf."""
    top = ngf * 2**n_up
    layers: list[nn.Module] = [ResnetBlock(top, norm) for _ in range(n_blocks)]
    for i in range(n_up, 0, -1):
        layers.append(up(ngf * 2**i, ngf * 2 ** (i - 1), norm))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """pix2pixHD/vid2vid init: conv weights N(0, std), norm scales N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
