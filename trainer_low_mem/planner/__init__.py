"""The planner: from the machine's limits and the model's memory, an explained `Plan`.

Modules, in reading order: `model_memory` (what a model costs: `ModelShape`, `ModelMemory`, the
analytic count), `probe` (measured on a GPU), `trace` and `traced_memory` (a training step on
fake tensors), `estimate` (which of the three a job uses), `machine` (cores, devices), `batch`
(the global batch's split), `footprint` (memory as lines in the micro-batch), `sharding` (a
rank's states under FSDP2 and ZeRO-3), `explain` (reasons, table), `plan` (`Plan` and its
derive methods), `arithmetic` (`plan(...)`), `job` (`plan_for_job`).
"""

from trainer_low_mem.planner.arithmetic import plan
from trainer_low_mem.planner.batch import divisors, per_rank_batch
from trainer_low_mem.planner.explain import Reason
from trainer_low_mem.planner.footprint import Footprint
from trainer_low_mem.planner.job import agree_across_ranks, plan_for_job
from trainer_low_mem.planner.machine import detect_devices, usable_cores
from trainer_low_mem.planner.model_memory import ModelMemory, ModelShape, analytic_model_memory
from trainer_low_mem.planner.plan import Plan
from trainer_low_mem.planner.probe import probe_model_memory

__all__ = [
    "Footprint",
    "ModelMemory",
    "ModelShape",
    "Plan",
    "Reason",
    "agree_across_ranks",
    "analytic_model_memory",
    "detect_devices",
    "divisors",
    "per_rank_batch",
    "plan",
    "plan_for_job",
    "probe_model_memory",
    "usable_cores",
]
