"""Running a trained model: cell embeddings (:mod:`.embed`) and zero-shot class scores (:mod:`.zero_shot`).

Token sequences in, numpy arrays out; no training loop and no optimiser here. The AnnData-facing
wrappers are in :mod:`langcell.tl`.
"""
