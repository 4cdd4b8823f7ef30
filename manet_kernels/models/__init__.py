"""ResNets with the attention variants, on the fused or the reference kernels.

``create(name, num_classes, kernels="fused"|"reference", backend="auto", **options)``
builds ``[prefix]resnet<depth>[_brnpa]``; ``list_models()`` lists the names;
``convert(model, kernels)`` swaps the attention modules between the two flavours in
place (timm's ``CbamModule`` and ``CondConv2d`` too); ``create("timm:<name>",
timm_args=...)`` builds a converted timm model. Outputs: logits, ``ABNOutput``
(``abn_``/``manet_``) or ``BRNPAOutput`` (``_brnpa``); ``logits_of``,
``classification_loss`` and ``attention_maps`` work on any of them. Every model has
``cam_layer`` (the module whose output is the final feature map; timm models: the last
``feature_info`` module) and, when its classifier is GAP + linear, ``fc``.
"""

from manet_kernels.models.abn import ABNResNet, AttentionBranch
from manet_kernels.models.blocks import BasicBlock, Bottleneck, SqueezeExcitation
from manet_kernels.models.convert import ConvertSummary, convert
from manet_kernels.models.outputs import (
    ABNOutput,
    BRNPAOutput,
    attention_maps,
    classification_loss,
    logits_of,
)
from manet_kernels.models.registry import create, list_models
from manet_kernels.models.resnet import ResNet

__all__ = ["create", "list_models", "convert", "ConvertSummary", "ABNOutput", "BRNPAOutput",
           "logits_of", "classification_loss", "attention_maps", "ResNet", "ABNResNet",
           "AttentionBranch", "BasicBlock", "Bottleneck", "SqueezeExcitation"]
