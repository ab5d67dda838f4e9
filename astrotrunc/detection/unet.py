"""The r1 network: a small, fully convolutional U-Net (image in, per-pixel logits out)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["UNet", "inference_copy", "narrowed_weights"]


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class _MergeBlock(nn.Sequential):
    """A decoder level's layers (a `_ConvBlock`'s), on the up-convolution's output and the skip
    connection concatenated."""

    def forward(self, up, skip):
        return super().forward(torch.cat([up, skip], dim=1))


class _SplitMerge(nn.Module):
    """A `_MergeBlock` for inference: its first convolution, over the concatenation, as one
    convolution of the up-convolution's output plus one of the skip connection (the same sum;
    OpenVINO adds the second into the first's output, and no concatenated map is written;
    torch and ONNX Runtime add them apart, which is slower than the concatenation).

    ``layers``: the block's layers, batch normalisations fused; ``n_up``: the up-convolution's
    channels, the first of the concatenation.
    """

    def __init__(self, layers, n_up):
        super().__init__()
        conv = layers[0]
        self.up_conv = nn.Conv2d(n_up, conv.out_channels, 3, padding=1).to(conv.weight)
        self.skip_conv = nn.Conv2d(conv.in_channels - n_up, conv.out_channels, 3, padding=1,
                                   bias=False).to(conv.weight)
        with torch.no_grad():
            self.up_conv.weight.copy_(conv.weight[:, :n_up])
            self.skip_conv.weight.copy_(conv.weight[:, n_up:])
            self.up_conv.bias.copy_(conv.bias)  # fused with its batch normalisation: a bias
        self.rest = nn.Sequential(*layers[1:])

    def forward(self, up, skip):
        return self.rest(self.up_conv(up) + self.skip_conv(skip))


class UNet(nn.Module):
    """A small U-Net: ``(n, c_in, H, W) -> (n, c_out, H, W)`` logits.

    Parameters
    ----------
    in_channels, out_channels : int
        Input and output channels.
    base_channels : int
        Channels at full resolution; doubled at each level.
    depth : int
        Number of down-sampling steps; H and W are padded to multiples of
        ``space_to_depth * 2**depth``.
    space_to_depth : int
        Fold every ``f x f`` block of input pixels into channels before the U-Net and unfold the
        output back (`torch.nn.functional.pixel_unshuffle` / ``pixel_shuffle``): the U-Net then
        runs at ``1/f`` of the resolution, about ``f**2`` times cheaper per map at the same
        widths, and still outputs every pixel. 1 (the default) runs at full resolution.
    widths : sequence of int, optional
        Channels at each level, full resolution first, instead of ``base_channels`` doubled
        ``depth`` times (``depth`` is then ``len(widths) - 1``). Narrower deep levels make a
        cheaper network: most of the time goes to the first two levels.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.detection.unet import UNet
    >>> UNet(1, 3, base_channels=4, depth=2)(torch.zeros(2, 1, 37, 50)).shape
    torch.Size([2, 3, 37, 50])
    >>> UNet(1, 3, base_channels=4, depth=2, space_to_depth=2)(torch.zeros(2, 1, 37, 50)).shape
    torch.Size([2, 3, 37, 50])
    >>> UNet(1, 3, widths=(8, 8, 16))(torch.zeros(2, 1, 37, 50)).shape
    torch.Size([2, 3, 37, 50])
    """

    def __init__(self, in_channels=1, out_channels=1, base_channels=16, depth=3,
                 space_to_depth=1, widths=None):
        super().__init__()
        chans = ([base_channels * 2**i for i in range(depth + 1)] if widths is None
                 else [int(w) for w in widths])
        depth = len(chans) - 1
        self.depth, self.space_to_depth = depth, int(space_to_depth)
        f2 = self.space_to_depth**2
        # no weights (nothing in the state dict); `inference_copy` makes it a convolution
        self.unshuffle = nn.PixelUnshuffle(self.space_to_depth)
        self.down = nn.ModuleList([_ConvBlock(in_channels * f2, chans[0])]
                                  + [_ConvBlock(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_MergeBlock(*_ConvBlock(2 * chans[i], chans[i]))
                                    for i in reversed(range(depth))])
        # output channel c is head channels c * f2 ... (c + 1) * f2 - 1 (pixel_shuffle's order)
        self.head = nn.Conv2d(chans[0], out_channels * f2, 1)
        # source centres are rare (~1 % of pixels): start at low prior odds, not at 1:1
        nn.init.constant_(self.head.bias, -5.0)

    @property
    def widths(self):
        """Channels at each level, full resolution first."""
        return [block[0].out_channels for block in self.down]

    def forward(self, x):
        h, w = x.shape[-2:]
        f = self.space_to_depth
        m = f * 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        if f > 1:
            x = self.unshuffle(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(up(x), skips.pop())
        x = self.head(x)
        if f > 1:
            x = nn.functional.pixel_shuffle(x, f)
        return x[..., :h, :w]


def _strongest(bn, k):
    """Indices (increasing) of the ``k`` channels of ``bn`` with the largest ``|scale|``."""
    return torch.argsort(bn.weight.detach().abs(), descending=True)[:k].sort().values


def _narrow_block(state, name, wide, narrow, in_sel):
    """``state`` entries of `_ConvBlock` ``narrow`` from ``wide``; the output channels kept."""
    c1, b1, _, c2, b2, _ = wide
    mid, out = _strongest(b1, narrow[0].out_channels), _strongest(b2, narrow[3].out_channels)
    state[f"{name}.0.weight"] = c1.weight[mid][:, in_sel]
    state[f"{name}.3.weight"] = c2.weight[out][:, mid]
    for i, bn, sel in ((1, b1, mid), (4, b2, out)):
        for key, value in bn.state_dict().items():
            state[f"{name}.{i}.{key}"] = value if value.ndim == 0 else value[sel]
    return out


def narrowed_weights(wide, narrow):
    """Weights for ``narrow`` from a wider or deeper trained `UNet` (network slimming).

    Each convolution keeps the channels whose batch normalisation has the largest scales (the
    criterion of Liu et al. 2017, "Learning efficient convolutional networks through network
    slimming"), and every later layer the weights of the channels kept. A shallower ``narrow``
    takes ``wide``'s levels down to its own depth: its deepest encoder level feeds the
    up-convolution that ``wide``'s next level fed. The narrower network does not compute the
    wider one's function, but starts near it: fine-tuning or distilling
    (`~astrotrunc.detection.teacher_labels`) from there is far shorter than from random weights.
    The full-resolution level, where most of the time goes, is often as wide in both and is
    then copied whole.

    Parameters
    ----------
    wide : `UNet`
        The trained network.
    narrow : `UNet`
        The network to initialise: the same space-to-depth factor and input and output
        channels, no greater depth and no level wider than ``wide``'s.

    Returns
    -------
    dict
        A state dict for ``narrow`` (``narrow.load_state_dict(...)``).

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.detection.unet import UNet, narrowed_weights
    >>> wide, narrow = UNet(1, 2, widths=(4, 8, 16)), UNet(1, 2, widths=(4, 4, 8))
    >>> narrow.load_state_dict(narrowed_weights(wide, narrow))
    <All keys matched successfully>
    >>> torch.equal(narrow.down[0][0].weight, wide.down[0][0].weight)  # level 0: copied whole
    True
    >>> shallow = UNet(1, 2, widths=(4, 8))  # the levels down to its depth
    >>> shallow.load_state_dict(narrowed_weights(wide, shallow))
    <All keys matched successfully>
    >>> torch.equal(shallow.up[0].weight, wide.up[1].weight)
    True
    """
    same = ((wide.space_to_depth, wide.down[0][0].in_channels, wide.head.out_channels)
            == (narrow.space_to_depth, narrow.down[0][0].in_channels, narrow.head.out_channels))
    if (not same or narrow.depth > wide.depth
            or any(n > w for n, w in zip(narrow.widths, wide.widths))):
        msg = ("narrowed_weights needs a network at least as wide and deep, with the same "
               f"space-to-depth factor and input and output channels: widths {wide.widths} -> "
               f"{narrow.widths}, depth {wide.depth} -> {narrow.depth}, space_to_depth "
               f"{wide.space_to_depth} -> {narrow.space_to_depth}")
        raise ValueError(msg)
    dropped = wide.depth - narrow.depth  # the deepest levels, which a shallower one lacks
    state = {}
    with torch.no_grad():
        sel, skips = torch.arange(wide.down[0][0].in_channels), []
        for i, (w, n) in enumerate(zip(wide.down, narrow.down)):
            sel = _narrow_block(state, f"down.{i}", w, n, sel)
            skips.append((sel, w[3].out_channels))
        skips.pop()
        for i, (wu, nu, wm, nm) in enumerate(zip(wide.up[dropped:], narrow.up,
                                                 wide.merge[dropped:], narrow.merge)):
            # the up-convolution's outputs: those with the largest weights from the kept inputs
            norms = wu.weight[sel].pow(2).sum((0, 2, 3))
            up = torch.argsort(norms, descending=True)[:nu.out_channels].sort().values
            state[f"up.{i}.weight"], state[f"up.{i}.bias"] = wu.weight[sel][:, up], wu.bias[up]
            skip, offset = skips.pop()
            sel = _narrow_block(state, f"merge.{i}", wm, nm, torch.cat([up, skip + offset]))
        state["head.weight"], state["head.bias"] = wide.head.weight[:, sel], wide.head.bias
    return {k: v.detach().clone() for k, v in state.items()}


def inference_copy(net, channels=None, split_merges=False):
    """A copy of a trained `UNet` for fast inference; the original is left untouched.

    Every convolution absorbs the batch normalisation that follows it (the evaluation-mode
    statistics), the weights are laid out channels-last (faster convolutions on CPU) and, with
    ``channels``, the head computes only those output channels. The copy gives the network's
    evaluation-mode output to float32 rounding; it is for inference only (no gradients, no
    batch statistics).

    Parameters
    ----------
    net : `UNet`
        The network.
    channels : sequence of int, optional
        Output channels to keep (all by default).
    split_merges : bool
        Each decoder level convolves the up-convolution's output and the skip connection apart
        and adds the results, instead of concatenating them (`_SplitMerge`): faster in OpenVINO,
        slower in torch and ONNX Runtime.

    Returns
    -------
    `UNet`
        In evaluation mode, without gradients.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.detection.unet import UNet, inference_copy
    >>> net = UNet(1, 3, base_channels=4, depth=2).eval()
    >>> x = torch.rand(2, 1, 32, 32)
    >>> fast = inference_copy(net, channels=[1])
    >>> torch.allclose(fast(x), net(x)[:, 1:2], atol=1e-5)
    True
    >>> torch.allclose(inference_copy(net, split_merges=True)(x), net(x), atol=1e-5)
    True
    >>> net = UNet(1, 3, base_channels=4, depth=2, space_to_depth=2).eval()
    >>> torch.allclose(inference_copy(net, channels=[2])(x), net(x)[:, 2:3], atol=1e-5)
    True
    """
    fast = copy.deepcopy(net).eval()
    for blocks in (fast.down, fast.merge):
        for i, block in enumerate(blocks):
            layers, fused = list(block), []
            for layer in layers:
                if isinstance(layer, nn.BatchNorm2d) and fused and isinstance(fused[-1], nn.Conv2d):
                    fused[-1] = nn.utils.fusion.fuse_conv_bn_eval(fused[-1], layer)
                else:
                    fused.append(layer)
            if blocks is fast.down:
                blocks[i] = nn.Sequential(*fused)
            else:
                blocks[i] = (_SplitMerge(fused, fast.up[i].out_channels) if split_merges
                             else _MergeBlock(*fused))
    if channels is not None:
        f2 = fast.space_to_depth**2
        n_out = fast.head.out_channels // f2
        keep = torch.as_tensor(list(channels), dtype=torch.long)
        if keep.numel() == 0 or keep.min() < 0 or keep.max() >= n_out:
            msg = f"channels must be indices of the {n_out} output channels, got {list(channels)}"
            raise ValueError(msg)
        keep = (keep[:, None] * f2 + torch.arange(f2)).ravel()
        head = nn.Conv2d(fast.head.in_channels, len(keep), 1).to(fast.head.weight)
        head.weight.data.copy_(fast.head.weight.data[keep])
        head.bias.data.copy_(fast.head.bias.data[keep])
        fast.head = head
    if fast.space_to_depth > 1:
        fast.unshuffle = _unshuffle_conv(fast.down[0][0].in_channels, fast.space_to_depth,
                                         fast.head.weight)
    fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


def _unshuffle_conv(channels, f, like):
    """`torch.nn.PixelUnshuffle` ``(n, c, H, W) -> (n, channels, H/f, W/f)`` as a stride-``f``
    convolution whose weights pick each pixel of the block: the same numbers (0 and 1 weights on
    finite maps), and ONNX Runtime no longer transposes the reshaped map, 6-8 % of the network's
    time on a 128 x 128 map (2 x 2 blocks)."""
    f2 = f * f
    conv = nn.Conv2d(channels // f2, channels, f, stride=f, bias=False).to(like)
    with torch.no_grad():
        conv.weight.zero_()
        out = torch.arange(channels)  # output channel c f² + a f + b is pixel (a, b) of c
        conv.weight[out, out // f2, (out % f2) // f, out % f] = 1.0
    return conv
