"""Pruning: criteria score channels, selection picks them, masks zero them, surgery removes them.

    from tandem.prune import prune
    small = prune(model, torch.randn(1, 3, 32, 32), criterion="fpgm", macs_target=0.5)

Modules: groups (which channels are coupled, traced with torch.fx), criteria (l1, l2, fpgm,
bn_scale, hrank, random, magnitude), select (per-layer / global / MACs target), masks (hard, soft,
per-weight magnitude), gates (learned channel gates as modules), surgery (the smaller nn.Module), schedules (engine callbacks), api.
"""
import sys
import types

from .api import ChannelPruner, prune
from .criteria import Criterion, criterion_class, get_criterion, list_criteria, register_criterion
from .groups import ChannelGraph, Group, Member
from .gates import ChannelGates, SignGate, ThresholdGate, gate_, gates_of, remove_closed, ungate_
from .masks import apply_weight_masks, magnitude_masks, zero_channels
from .schedules import KeepMasked, SlimmingPenalty, SoftPruning
from .select import MacsModel, select
from .spec import PruneSpec
from .surgery import apply_removal, remove_channels

__all__ = ["prune", "ChannelPruner", "ChannelGraph", "Group", "Member", "Criterion", "criterion_class",
           "get_criterion", "list_criteria", "register_criterion", "select", "MacsModel", "zero_channels", "gate_", "ungate_",
           "gates_of", "remove_closed", "ChannelGates", "SignGate", "ThresholdGate",
           "magnitude_masks", "apply_weight_masks", "remove_channels", "apply_removal", "SlimmingPenalty",
           "SoftPruning", "KeepMasked", "PruneSpec"]


class _CallablePackage(types.ModuleType):
    """``tandem.prune(model, ...)`` is ``tandem.prune.prune(model, ...)``; attributes are the package's."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
