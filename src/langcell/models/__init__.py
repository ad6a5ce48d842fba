"""The tensor core: cell encoder, text encoder and the LangCell model that joins them."""

from langcell.models.cell_encoder import CellEncoder
from langcell.models.langcell import LangCell
from langcell.models.text_encoder import TextEncoder

__all__ = ["CellEncoder", "LangCell", "TextEncoder"]
