"""The fine-tuning recipe behind ``python -m adtuning.train``.

- :mod:`~adtuning.recipe.config`: the typed run configuration (one dataclass per concern), checked once;
- :mod:`~adtuning.recipe.cli`: the command line generated from it, ``--config`` files, :func:`main`;
- :mod:`~adtuning.recipe.methods`: the methods of the paper's Table 2 the recipe trains;
- :mod:`~adtuning.recipe.problem`: the speech problem the search trains;
- :mod:`~adtuning.recipe.run`: the :class:`Recipe` (setup, Fisher, search, compare, evaluate, save);
- :mod:`~adtuning.recipe.summary`: ``summary.json``, the delta, the plots and the printout.
"""
from adtuning.recipe.config import RunConfig, UsageError

__all__ = ["RunConfig", "UsageError"]
