"""Cells as data: gene identifiers, counts sources, the rank-value tokenizer, corpora, batching, splits.

No torch and no model here: this layer turns counts (AnnData, h5ad files) into token sequences and back
into batches; it may use :mod:`langcell.ontology` for texts, never the layers above it. The gene tables
(``genes_<organism>.tsv.gz``) beside these modules are package data read by :mod:`.genes`.

Modules are imported directly (``from langcell.data.tokenizer import GeneTokenizer``); this package
re-exports nothing so that importing one of them loads only what it needs.
"""
