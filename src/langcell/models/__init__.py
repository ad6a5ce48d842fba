"""The tensor core: cell encoder, text encoder and the LangCell model that joins them."""

from .cell_encoder import CellEncoder
from .langcell import LangCell
from .text_encoder import TextEncoder

__all__ = ["CellEncoder", "LangCell", "TextEncoder"]
