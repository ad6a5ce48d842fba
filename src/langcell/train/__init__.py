"""Training: pretraining (two stages, four losses, one CPU or many GPUs via torchrun), LangCell-CE
fine-tuning and few-shot tuning, sharing one optimiser setup (:mod:`.optim`) and one supervised epoch
loop (:mod:`.supervised`).

Nothing below :mod:`langcell.tl` imports this package, so annotating, embedding and retrieving never
load it.
"""

from .config import PretrainConfig, load_recipe
from .pretrain import pretrain

__all__ = ["PretrainConfig", "load_recipe", "pretrain"]
