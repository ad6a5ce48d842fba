"""Training: LangCell pretraining (two stages, four losses, one CPU or many GPUs via torchrun)."""

from .pretrain import PretrainConfig, load_recipe, pretrain

__all__ = ["PretrainConfig", "load_recipe", "pretrain"]
