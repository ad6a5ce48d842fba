"""Seeded splits of labelled cells: stratified train/test (LangCell-CE, the demo) and n cells per class
(few-shot). Each draws from one ``numpy.random.default_rng(seed)`` so a split is reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._checks import check_fraction, check_positive_int
from ..errors import LangCellError


def stratified_split(
    codes: np.ndarray, train_fraction: float = 2 / 3, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split labelled items into train and test so that every class keeps its share in both.

    Class ``c`` with ``n_c`` items gives ``round(n_c * train_fraction)`` of them, clamped to
    ``[1, n_c - 1]``, to the training set (so each class is seen in training and tested), drawn at
    random; the classes are visited in increasing code order with one ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    codes
        Integer class code of every item; negative codes mark unlabelled items, left out of both sets.
    train_fraction
        Share of each class that goes to training, in (0, 1).
    seed
        The same seed gives the same split.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted ``int64`` indices into ``codes``.

    Raises
    ------
    LangCellError
        If ``train_fraction`` is outside (0, 1) or a class has fewer than two items.
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise LangCellError("codes must be a 1-D integer array (one class code per item, -1 = unlabelled)")
    check_fraction(train_fraction)
    rng = np.random.default_rng(seed)
    train, test = [], []
    classes, counts = np.unique(codes[codes >= 0], return_counts=True)
    too_small = classes[counts < 2]
    if too_small.size:
        raise LangCellError(
            f"classes {too_small.tolist()} have fewer than 2 items, too few for a train/test split; "
            "drop them or merge them with another class"
        )
    for code, count in zip(classes, counts, strict=True):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_train = min(max(int(round(count * train_fraction)), 1), int(count) - 1)
        train.append(members[:n_train])
        test.append(members[n_train:])
    if not train:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def sample_shots(
    codes: np.ndarray,
    n_per_class: int,
    *,
    seed: int,
    min_test: int = 1,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_per_class`` training items of every class; the other labelled items are the test set.

    Each class's items are put in a random order (one ``numpy.random.default_rng(seed)``, classes
    visited in increasing code order) and the first ``n_per_class`` are taken. The order does not
    depend on ``n_per_class``, so with one seed the training items of a smaller ``n`` are a subset of
    those of a larger one (the few-shot curve adds cells rather than redrawing them).

    Parameters
    ----------
    codes
        Integer class code of every item; negative codes mark unlabelled items, in neither set.
    n_per_class
        Training items per class (at least 1).
    seed
        The same seed gives the same split.
    min_test
        Every class must keep at least this many test items: a class needs ``n_per_class + min_test``
        items.
    class_names
        Names of the codes, for error messages.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted ``int64`` indices into ``codes``.

    Raises
    ------
    LangCellError
        For codes that are not a 1-D integer array, no labelled item, ``n_per_class`` or ``min_test``
        not a positive integer, or a class with fewer than ``n_per_class + min_test`` items (named,
        with its size: lower ``n_per_class`` or leave the class out).
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise LangCellError("codes must be a 1-D integer array (one class code per item, -1 = unlabelled)")
    n_per_class = check_positive_int(n_per_class, "n_per_class (shots)")
    min_test = check_positive_int(min_test, "min_test")
    classes, counts = np.unique(codes[codes >= 0], return_counts=True)
    if classes.size == 0:
        raise LangCellError("no labelled item (every code is negative); label some cells")
    too_small = counts < n_per_class + min_test
    if too_small.any():
        named = [
            f"{class_names[c]!r} ({n} cells)" if class_names is not None else f"{c} ({n} items)"
            for c, n in zip(classes[too_small], counts[too_small], strict=True)
        ]
        raise LangCellError(
            f"{n_per_class}-shot sampling needs at least {n_per_class + min_test} cells per class "
            f"({n_per_class} to train, {min_test} to test), but these classes have fewer: "
            f"{', '.join(named)}; "
            "lower the shots or leave those classes out (labels=[the classes to keep])"
        )
    rng = np.random.default_rng(seed)
    train = [rng.permutation(np.flatnonzero(codes == code))[:n_per_class] for code in classes]
    train = np.sort(np.concatenate(train)).astype(np.int64)
    test = np.setdiff1d(np.flatnonzero(codes >= 0), train).astype(np.int64)
    return train, test


def run_seed(seed: int, *parts: int) -> int:
    """A seed for one part of the protocol, independent of the seeds of the other parts."""
    return int(np.random.SeedSequence([int(seed), *map(int, parts)]).generate_state(1)[0])


def held_out_split(adata, label_key: str = "cell_type", *, test_size: float = 0.2, seed: int = 0):
    """The demo's split: ``train_test_split`` of the cells, stratified by ``obs[label_key]``, seeded.

    Returns
    -------
    train, test : anndata.AnnData
        Copies, each in the original cell order.
    """
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=test_size, random_state=seed,
        stratify=adata.obs[label_key].astype(str).to_numpy(),
    )
    return adata[np.sort(train_idx)].copy(), adata[np.sort(test_idx)].copy()
