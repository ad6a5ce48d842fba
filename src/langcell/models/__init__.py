"""The tensor core: torch modules and their file format, nothing of AnnData, files of cells or training.

:mod:`.config` (dataclass configs), :mod:`.layers` (the BERT blocks both towers share), :mod:`.packing`,
:mod:`.cell_encoder`, :mod:`.text_encoder`, :mod:`.langcell` (the two towers and the heads),
:mod:`.classifier` (LangCell-CE), :mod:`.batched` (running a module over many cells) and
:mod:`.serialization` (save / load; it imports no model class).
"""

from .cell_encoder import CellEncoder
from .classifier import CellTypeClassifier
from .langcell import LangCell
from .text_encoder import TextEncoder

__all__ = ["CellEncoder", "CellTypeClassifier", "LangCell", "TextEncoder"]
