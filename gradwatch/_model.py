"""Which modules of a model gradwatch watches: layers, activation modules, and the modules it traces for NaN."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .store.schema import ROOT_NAME

# Units of these are dead when never positive: their output is > 0 exactly when their input is.
RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.PReLU)
SATURATING = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
# Modules that cannot turn finite inputs into NaN/Inf: the tracer only carries their inputs' verdict on.
PASS_THROUGH = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
    nn.Unflatten, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
) + RELU_FAMILY + tuple(SATURATING)
# Pure containers return a child's output unchanged, so tracing them adds nothing (except at the root,
# whose output is the model's).
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Modules that, with finite inputs and finite parameters, return finite float32/bfloat16 outputs: affine
# maps, normalisations with an eps, poolings, paddings, gated RNNs, a stable softmax. Their outputs are
# probed on detail steps (non-finite weights show there) and in float16, where an affine map can overflow
# 65504; otherwise a NaN they pass on is probed by the next module that is not one of them, or by the
# model's output. This spares a full pass over most activations on most steps.
SAFE_IN_FLOAT32 = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
    nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.Embedding, nn.EmbeddingBag, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
    nn.RNNBase, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.ChannelShuffle,
)
CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


@dataclass
class Layer:
    """A module that owns parameters directly."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    n_params: int


@dataclass
class Activation:
    """An activation module: ReLU family (dead units) or tanh/sigmoid (saturation)."""

    name: str
    module: nn.Module
    kind: str  # "relu" | "tanh" | "sigmoid"
    channels_first: bool  # a 3-d output is (N, C, L) when the layer before is a conv or a norm


@dataclass
class ModelMap:
    layers: list[Layer] = field(default_factory=list)
    activations: list[Activation] = field(default_factory=list)
    traced: list[tuple[str, nn.Module]] = field(default_factory=list)  # checked for NaN/Inf outputs
    safe: set[int] = field(default_factory=set)  # traced indices of SAFE_IN_FLOAT32 modules
    root_traced: int | None = None  # traced index of the model itself
    passing: list[nn.Module] = field(default_factory=list)  # pass-through modules, verdict carried over
    params: list[nn.Parameter] = field(default_factory=list)  # unique watched parameters
    param_of_pair: list[int] = field(default_factory=list)  # (param, layer) pairs: a tied weight is in two
    layer_of_pair: list[int] = field(default_factory=list)

    def summary(self, model: nn.Module) -> dict:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "class": type(model).__name__,
            "parameters": total,
            "trainable_parameters": trainable,
            "layers": [
                {"name": ly.name, "type": type(ly.module).__name__, "parameters": ly.n_params,
                 "trainable": any(p.requires_grad for p in ly.params),
                 "shapes": {n: list(p.shape) for n, p in ly.module.named_parameters(recurse=False)}}
                for ly in self.layers
            ],
            # every module, in registration order: detectors look for e.g. a Softmax at the very end
            "modules": [[name or ROOT_NAME, type(m).__name__] for name, m in model.named_modules()],
            "activations": [{"name": a.name, "type": type(a.module).__name__, "kind": a.kind}
                            for a in self.activations],
        }


def map_model(model: nn.Module, include: list[str] | None, exclude: list[str] | None) -> ModelMap:
    """Walk `model.named_modules()` once, in registration order, and sort each module into its role."""
    mm = ModelMap()
    param_index: dict[int, int] = {}
    last_param_module: nn.Module | None = None
    for qual, module in model.named_modules():
        name = qual or ROOT_NAME
        own = [p for p in module.parameters(recurse=False)]
        if not _selected(name, include, exclude):
            if own:
                last_param_module = module
            continue
        if own:
            layer_idx = len(mm.layers)
            mm.layers.append(Layer(name, module, own, sum(p.numel() for p in own)))
            for p in own:
                if id(p) not in param_index:
                    param_index[id(p)] = len(mm.params)
                    mm.params.append(p)
                mm.param_of_pair.append(param_index[id(p)])
                mm.layer_of_pair.append(layer_idx)
        kind = _activation_kind(module)
        if kind:
            first = kind == "relu" and isinstance(last_param_module, CHANNELS_FIRST)
            mm.activations.append(Activation(name, module, kind, first))
        elif isinstance(module, PASS_THROUGH):
            mm.passing.append(module)
        elif type(module) not in CONTAINERS or module is model:
            if module is model:
                mm.root_traced = len(mm.traced)
            if isinstance(module, SAFE_IN_FLOAT32):
                mm.safe.add(len(mm.traced))
            mm.traced.append((name, module))
        if own:
            last_param_module = module
    return mm


def _activation_kind(module: nn.Module) -> str | None:
    if isinstance(module, RELU_FAMILY):
        return "relu"
    for cls, kind in SATURATING.items():
        if isinstance(module, cls):
            return kind
    return None


def _selected(name: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude))


def is_nonnegative(module: nn.Module) -> bool:
    """ReLU and ReLU6 outputs are never negative, so their sign is already a 0/1 mask."""
    return isinstance(module, (nn.ReLU, nn.ReLU6))
