"""Pruners: the algorithms that decide *what* to prune. Passes decide *how*.

A pruner is any object with ``compute_masks(gm, analysis) -> {tensor name: mask}``
(the :class:`Pruner` protocol). Structured pruners derive from
:class:`ChannelPruner` and only implement ``channel_scores``; fine-grained ones
mask single weights. Training-aware methods (schedules, movement, ADMM,
lottery ticket) drive the user's :class:`Evaluator`.

==================  ==============================================  ==========
criterion           class                                           needs data
==================  ==============================================  ==========
L1 / L2 norm        :class:`L1Norm`, :class:`L2Norm`                no
geometric median    :class:`FPGM`                                   no
LAMP                :class:`LAMP` (global allocation)               no
BN scaling factor   :class:`Slim` (+ :func:`slim_penalty`)          training
random baseline     :class:`RandomPruner`                           no
APoZ / mean act.    :class:`APoZ`, :class:`MeanActivation`          batches
|W|·||X|| (Wanda)   :class:`ActivationNorm`                         batches
Var(X)·|W|² (FLAP)  :class:`Fluctuation` (+ ``compensate-bias``)    batches
Taylor (g x w)      :class:`Taylor`                                 batches+loss
OBD (Hessian diag)  :class:`OBD`                                    batches+loss
level / N:M         :class:`LevelPruner`, :class:`NMPruner`         no
schedules           :class:`ScheduledPruning` + Linear/AGP          training
to a target         :class:`Targeted` (any channel criterion)       as criterion
movement, ADMM      :class:`MovementPruning`, :class:`ADMM`         training
lottery ticket      :class:`LotteryTicket`                          training
depth (ShortGPT)    :func:`depth_prune` (whole decoder layers)      batches
==================  ==============================================  ==========

:func:`recover` fine-tunes a pruned causal LM by distillation from the dense one, all its
weights or, with ``Recovery(adapters=LoRA(...))``, low-rank adapters merged afterwards.
"""

from fxcompress.prune.base import PRUNERS, Allocation, ChannelDecider, ChannelPruner, Combined, Pruner, make_pruner
from fxcompress.prune.budget import Budget, BudgetMetric, ShapeCost
from fxcompress.prune.data_aware import OBD, APoZ, ActivationNorm, Fluctuation, MeanActivation, Taylor
from fxcompress.prune.depth import DepthPruned, block_influence, decoder_layers, depth_prune, lowest_influence, remove_layers
from fxcompress.prune.distill import LayerwiseDistillation
from fxcompress.prune.evaluator import Evaluator, LRSchedule, recalibrate_batchnorm
from fxcompress.prune.lora import Adapters, LoRA, LoRALinear, add_adapters
from fxcompress.prune.magnitude import FPGM, LAMP, L1Norm, L2Norm, Normalizer, RandomPruner, Reduction, Slim, slim_penalty
from fxcompress.prune.nni import from_config_list
from fxcompress.prune.recover import Recovery, RecoveryResult, distillation_loss, recover, token_windows
from fxcompress.prune.schedule import AGPSchedule, LinearSchedule, Schedule, ScheduledPruning
from fxcompress.prune.target import Targeted, TargetFit, TargetWarning
from fxcompress.prune.training import ADMM, LotteryTicket, MovementPruning
from fxcompress.prune.unstructured import LevelPruner, NMPruner

__all__ = [
    "Pruner", "ChannelDecider", "ChannelPruner", "Allocation", "Combined", "PRUNERS", "make_pruner",
    "L1Norm", "L2Norm", "FPGM", "LAMP", "Slim", "slim_penalty", "RandomPruner", "Normalizer", "Reduction",
    "APoZ", "MeanActivation", "ActivationNorm", "Fluctuation", "Taylor", "OBD",
    "LevelPruner", "NMPruner",
    "Schedule", "LinearSchedule", "AGPSchedule", "ScheduledPruning",
    "MovementPruning", "ADMM", "LotteryTicket",
    "Evaluator", "LRSchedule", "recalibrate_batchnorm",
    "from_config_list", "LayerwiseDistillation",
    "Targeted", "TargetFit", "TargetWarning", "Budget", "BudgetMetric", "ShapeCost",
    "block_influence", "lowest_influence", "remove_layers", "depth_prune", "decoder_layers", "DepthPruned",
    "recover", "Recovery", "RecoveryResult", "distillation_loss", "token_windows",
    "LoRA", "LoRALinear", "Adapters", "add_adapters",
]
