"""Consolidation ("sleep"): contrastive training of the memory's keys, key refresh, reports.

- :class:`Consolidator` runs a sleep phase; :class:`ConsolidationHook` runs it every few
  collector batches (plain loops and TorchRL trainers);
- :class:`PairSampler` draws anchor / positive windows from a
  :class:`~torchrl_hippo.HippoStorage`;
- :class:`MixtureRatioScheduler` ramps a :class:`~torchrl_hippo.HippoSampler`'s
  ``mixture_ratio``;
- :func:`log_metrics` and :func:`log_key_snapshot` write to TorchRL loggers and TensorBoard.

The loss is :class:`torchrl_hippo.objectives.ReturnAwareContrastiveLoss`; the metrics'
formulas are in :mod:`torchrl_hippo.metrics`.
"""

from torchrl_hippo.consolidation.consolidator import ConsolidationHook, Consolidator
from torchrl_hippo.consolidation.pairs import PairSampler, eligible_rows
from torchrl_hippo.consolidation.reporting import log_key_snapshot, log_metrics
from torchrl_hippo.consolidation.schedules import MixtureRatioScheduler

__all__ = [
    "ConsolidationHook",
    "Consolidator",
    "MixtureRatioScheduler",
    "PairSampler",
    "eligible_rows",
    "log_key_snapshot",
    "log_metrics",
]
