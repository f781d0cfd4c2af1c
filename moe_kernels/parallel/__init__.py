"""Expert parallelism over ``torch.distributed``: :class:`ExpertParallelMoE` and its
functional twin (:mod:`.layer`), routing with global capacity (:mod:`.routing`), and the
autograd-aware collectives (:mod:`.comm`)."""

from .layer import ExpertParallelMoE, expert_parallel_experts, expert_parallel_moe, local_expert_range

__all__ = ["ExpertParallelMoE", "expert_parallel_experts", "expert_parallel_moe", "local_expert_range"]
