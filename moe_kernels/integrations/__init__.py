"""Integrations with model libraries.

* :mod:`moe_kernels.integrations.transformers`: the ``"moe_kernels"`` experts
  implementation for HF transformers >= 5 (``experts_implementation="moe_kernels"``).
  Importing it imports transformers.
* :mod:`moe_kernels.integrations.replace`: :func:`replace_moe_layers` for model code that
  keeps its experts as an ``nn.ModuleList`` of MLPs (transformers 4.x style, or a user's
  own blocks). Needs only torch.

This package itself imports nothing, so ``import moe_kernels`` never imports
transformers.
"""
