"""Zero-shot scoring of cells against class texts (tensor level: no AnnData here).

LangCell annotates cells without training on them: every candidate class is described in words, the
cells and the class texts are embedded in the shared space, and the cell-text matching (CTM) head
judges each (cell, class) pair. :func:`langcell.tl.annotate` is the AnnData layer over this module.

The released formula
--------------------
What the released notebook (``LangCell-annotation-zeroshot/zero-shot.ipynb`` of PharMolix/LangCell)
computes, read from its source:

1. Class text embeddings: each class text is encoded on its own by the unimodal text tower;
   ``text_proj`` of the ``[CLS]`` state, L2-normalised.
2. Cell embeddings: ``cell_proj`` of the ``<cls>`` state, L2-normalised; batches of 32 cells.
3. ``p_sim = softmax_k(cos(cell, text_k) / 0.05)`` over the K classes (a fixed temperature of
   0.05, not the trained ``logit_scale``).
4. For every class k, the text is tokenised again, repeated once per cell of the batch and run
   through the multimodal text tower against that batch's cell token states; the match probability is
   ``softmax(ctm_head(first-token state))[1]``. The first token is ``[CLS]`` (the notebook adds an
   ``[ENC]`` token to its tokenizer but never substitutes it).
5. ``p_ctm = softmax_k(match_prob_k)``: the softmax is applied over the classes to the match
   *probabilities* (values in [0, 1], so ``p_ctm`` is never far from uniform when K is large).
6. ``score = alpha * p_sim + (1 - alpha) * p_ctm`` with ``alpha = 0.1`` in the cell that reports
   the accuracy (the loop itself prints ``(p_sim + p_ctm) / 2``, which is not used for the result);
   the prediction is the argmax.

``mode="official"`` computes exactly this, for every (cell, class) pair, but without the release's
waste: class texts are tokenised and embedded once, each cell's cross-attention keys/values are
projected once for all classes (:meth:`langcell.models.LangCell.match_logits`), and cells are batched by
length under a token budget.

The fast mode
-------------
``mode="fast"`` runs CTM only for each cell's ``top_k`` classes by similarity. A class that was not
scored is treated as a certain non-match, match probability 0: the official formula is then applied
unchanged, so ``p_ctm_k = exp(m_k) / (sum over scored classes of exp(m_j) + (number unscored) * exp(0))``.
This is the released ``p_ctm`` with the unscored probabilities set to their lower bound; it keeps the
K-term denominator of the release (so the relative weight of ``p_sim`` and ``p_ctm`` stays close to
the official one, also for large K), is exact whenever the unscored classes' match probabilities are
indeed ~0 (what a trained CTM head gives for classes the similarity ranks low), and with
``top_k = K`` it *is* the official computation. Because unscored classes have both a lower similarity
and the smallest possible ``p_ctm``, none of them can outscore the best of the top_k: the fast
prediction is always one of the top_k classes by similarity.

The fast prediction can still differ from the official one when the unscored classes' true match
probabilities are not ~0 (the official denominator is then larger, which shifts the balance between
``p_sim`` and ``p_ctm`` inside the top_k, and an unscored class could even win). ``exact_argmax=True``
removes that risk at a price that depends on the data: the official score of a class is linear in
``1 / Z`` (``Z`` the official denominator), and ``Z`` lies between ``Z_lo`` (unscored probabilities 0,
the fast mode's value) and ``Z_hi`` (unscored probabilities 1); a cell is *certified* when the same
scored class wins at both ends of that interval and beats, at both ends, the best score any unscored
class could reach (match probability 1). A certified cell's fast prediction equals the official one
whatever the unscored probabilities are; every other cell gets CTM for all its classes, i.e. the
official computation. With ``exact_argmax=True`` the predictions therefore always equal
``mode="official"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_unit_interval
from .._progress import progress_bar
from ..data.batching import as_sequences, pad_sequences, token_budget_batches
from ..errors import LangCellError
from ..precision import check_precision, inference_precision

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MAX_PAIR_TOKENS",
    "DEFAULT_TOP_K",
    "MODES",
    "TEMPERATURE",
    "THRESHOLD_ON",
    "ClassTexts",
    "ZeroShotScores",
    "check_alpha",
    "check_top_k",
    "combine_scores",
    "encode_class_texts",
    "max_margin",
    "score_batch",
    "scaled_margin",
    "uncertified_cells",
    "zero_shot_scores",
]

TEMPERATURE = 0.05
"""Temperature of the similarity softmax in the released notebook (``cos / 0.05``)."""

DEFAULT_ALPHA = 0.1
"""Weight of ``p_sim`` in the final score (the released notebook's ``alpha``)."""

DEFAULT_TOP_K = 3
"""Classes per cell that the fast mode runs CTM for."""

DEFAULT_MAX_TOKENS = 16_384
"""Cell tokens per batch (batch size x padded length) for the cell encoder."""

DEFAULT_MAX_PAIR_TOKENS = 16_384
"""Text tokens per multimodal pass (padded): bounds the activation memory of the text tower."""

MODES = ("fast", "official")
"""The scoring modes; see the module docstring."""

THRESHOLD_ON = ("score", "margin")
"""What an abstention threshold compares: the best final score, or :func:`scaled_margin`."""


# --------------------------------------------------------------------------------------------------
# Checks shared with the AnnData layer
# --------------------------------------------------------------------------------------------------


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in [0, 1], or a :class:`LangCellError` saying how to fix it."""
    return check_unit_interval(alpha, "alpha", meaning="the weight of the similarity score", fix="the release uses 0.1")


def check_top_k(top_k: Any, n_classes: int) -> int:
    """The number of classes the fast mode scores with CTM.

    The rule: ``top_k`` must be an integer of at least 1; a value above the number of classes K is
    clamped to K (scoring every class, as ``mode="official"`` does), so that one default serves any
    class set.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise LangCellError(
            f"top_k must be a positive integer (classes reranked by CTM per cell), got {top_k!r}"
        )
    if top_k < 1:
        raise LangCellError(
            f"top_k must be at least 1, got {top_k}; pass e.g. top_k=3, or mode='official' to score "
            "every class"
        )
    return int(min(top_k, n_classes))


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------------
# Class texts, tokenised and embedded once
# --------------------------------------------------------------------------------------------------


@dataclass
class ClassTexts:
    """The candidate classes with their texts, tokenised once and embedded once.

    Attributes
    ----------
    names
        Class names, in column order of every score matrix.
    texts
        One text per class.
    input_ids, attention_mask
        ``[K, T]`` tokens of the texts (padded to the longest), on the model's device.
    embeddings
        ``[K, projection_dim]`` L2-normalised text embeddings (unimodal pass); for a class with several
        texts (a prompt ensemble), the normalised mean of its texts' normalised embeddings.
    prompts
        Every text of each class, its primary text (``texts[k]``) first; ``None`` when each class has
        one text.
    """

    names: list[str]  # class names, in column order
    texts: list[str]  # the text of each class
    input_ids: torch.Tensor  # [K, T] token ids, padded to the longest text
    attention_mask: torch.Tensor  # [K, T] 1 = token, 0 = padding
    embeddings: torch.Tensor  # [K, projection_dim] L2-normalised text embeddings
    prompts: list[list[str]] | None = None  # every text of each class (primary first); None = texts alone

    def __len__(self) -> int:
        return len(self.names)

    def tokens(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tokens of all classes, or of ``rows`` (class indices), trimmed to the longest of them.

        Trimming the all-padding tail changes no result (padding is masked) but saves compute when
        the selected texts are shorter than the longest class text.
        """
        ids, mask = self.input_ids, self.attention_mask
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        width = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
        return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


def encode_class_texts(
    model: Any,
    texts: Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]],
    names: Sequence[str] | None = None,
    *,
    max_length: int | None = None,
    precision: str = "fp32",
) -> ClassTexts:
    """Tokenise and embed the class texts once.

    Parameters
    ----------
    model
        A :class:`langcell.models.LangCell`.
    texts
        One text per class, or ``{name: text}``. A class may have several texts (a list, its primary
        text first): CLIP's prompt ensembling. Its embedding is then the normalised mean of the
        normalised embeddings of its texts, and the cell-text matching head scores its primary text.
        A class with one text gets exactly the embedding it would get alone.
    names
        Class names (default: the dict's keys, or the (primary) texts themselves).
    max_length
        Longest text in tokens (default and cap: the text tower's positions).
    precision
        Precision of the text passes (:func:`langcell.precision.inference_precision`; ``"int8"``
        quantises the cell side only, so the texts are embedded in fp32); the embeddings are stored in
        float32.

    Returns
    -------
    ClassTexts
    """
    if isinstance(texts, Mapping):
        if names is None:
            names = list(texts)
        texts = list(texts.values())
    prompts = [[t] if isinstance(t, str) else list(t) for t in texts]
    if not prompts:
        raise LangCellError("no class texts were given; pass at least one class with its text")
    if not all(p and all(isinstance(t, str) and t.strip() for t in p) for p in prompts):
        raise LangCellError("every class text must be a non-empty string; describe each class in words")
    primary = [p[0] for p in prompts]
    names = [str(n) for n in (primary if names is None else names)]
    if len(names) != len(primary):
        raise LangCellError(f"{len(names)} class names for {len(primary)} texts; pass one name per text")
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise LangCellError(f"class names {duplicated[:5]} are repeated; give each class once")
    device = model.logit_scale.device
    precision = check_precision(precision, device)
    tokens = model.tokenize_texts(primary, max_length=max_length)
    input_ids = tokens["input_ids"].to(device)
    attention_mask = tokens["attention_mask"].to(device)
    classes = ClassTexts(names, primary, input_ids, attention_mask, embeddings=torch.empty(0))
    # int8 quantises the cell side only (inference_precision): class texts are embedded in fp32 then.
    with inference_precision(model, precision, device, int8_part=model.cell_modules()), torch.inference_mode(), \
            _eval_mode(model):
        embeddings = _embed_tokens(model, classes.tokens)
        if any(len(p) > 1 for p in prompts):
            classes.prompts = prompts
            embeddings = _ensemble_embeddings(model, prompts, embeddings, max_length)
    classes.embeddings = embeddings
    return classes


def _embed_tokens(model: Any, tokens: Any) -> torch.Tensor:
    """``[K, D]`` float32 embeddings of the texts ``tokens(rows)`` gives, texts of similar length together."""
    lengths = tokens()["attention_mask"].sum(dim=1)
    parts = [
        (rows, model.encode_texts(tokens(rows)).float())
        for rows in _greedy_groups(lengths, 1, DEFAULT_MAX_PAIR_TOKENS)
    ]
    embeddings = torch.empty(len(lengths), parts[0][1].shape[1], dtype=parts[0][1].dtype, device=lengths.device)
    for rows, part in parts:
        embeddings[rows] = part
    return embeddings


def _ensemble_embeddings(
    model: Any, prompts: list[list[str]], primary: torch.Tensor, max_length: int | None
) -> torch.Tensor:
    """Prompt ensembling: each class with several texts gets the normalised mean of their embeddings."""
    extra = [(k, text) for k, p in enumerate(prompts) for text in p[1:]]
    tokens = model.tokenize_texts([text for _, text in extra], max_length=max_length)
    tokens = {key: value.to(primary.device) for key, value in tokens.items()}

    def select(rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        width = max(int(mask.sum(dim=1).max()), 1)
        return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}

    extra_embeddings = _embed_tokens(model, select)
    owners = torch.tensor([k for k, _ in extra], device=primary.device)
    total = primary.clone().index_add_(0, owners, extra_embeddings)
    counts = torch.tensor([len(p) for p in prompts], device=primary.device, dtype=total.dtype)
    ensembled = torch.nn.functional.normalize(total / counts[:, None], dim=-1)
    # A class with one text keeps its embedding bit for bit (normalising again could move the last bit).
    return torch.where((counts > 1)[:, None], ensembled, primary)


class _eval_mode:
    """Context manager: the model in eval mode (no dropout), its previous mode restored afterwards."""

    def __init__(self, model: Any):
        self.model = model
        self.was_training = bool(model.training)

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# --------------------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------------------


def combine_scores(
    similarity: torch.Tensor,
    match_prob: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released zero-shot formula.

    Parameters
    ----------
    similarity
        ``[N, K]`` cosine similarities of cells and class texts.
    match_prob
        ``[N, K]`` CTM match probabilities (``softmax(ctm logits)[..., 1]``); NaN marks a pair that was
        not scored, which counts as probability 0 (see the module docstring).
    alpha
        Weight of ``p_sim``.
    temperature
        Similarity temperature.

    Returns
    -------
    p_sim, p_ctm, scores : torch.Tensor
        ``softmax(similarity / temperature)``, ``softmax(match_prob)`` (both over the K classes) and
        ``alpha * p_sim + (1 - alpha) * p_ctm``; each row sums to 1.
    """
    p_sim = torch.softmax(similarity / temperature, dim=-1)
    p_ctm = torch.softmax(torch.nan_to_num(match_prob, nan=0.0), dim=-1)
    return p_sim, p_ctm, alpha * p_sim + (1.0 - alpha) * p_ctm



def max_margin(n_classes: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The largest gap :func:`combine_scores` can put between the best and the second-best class.

    ``p_sim`` can differ by at most 1 between two classes (one-hot). ``p_ctm`` is a softmax over match
    probabilities ``m`` in [0, 1]: ``(exp(m_a) - exp(m_b)) / sum_j exp(m_j)`` grows with ``m_a`` and
    falls with every other ``m``, so its largest value, ``(e - 1) / (e + K - 1)``, is reached at
    ``m_a = 1`` and every other ``m = 0``. Both happen at once, so the largest gap is
    ``alpha + (1 - alpha) (e - 1) / (e + K - 1)``.
    """
    return float(alpha + (1.0 - alpha) * (math.e - 1.0) / (math.e + n_classes - 1.0))


def scaled_margin(scores: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Per cell: the gap between its best and second-best final score over :func:`max_margin`.

    Final scores blend two softmaxes over the K classes, so they sit near ``1 / K`` and a threshold
    on them means something else for every K. This margin lies in [0, 1] for every K and ``alpha``:
    0 is a tie between the two best classes, 1 the clearest decision the formula can express. With a
    single class it is 1.

    Parameters
    ----------
    scores
        ``[N, K]`` final scores (:attr:`ZeroShotScores.scores`).
    alpha
        The weight of ``p_sim`` the scores were made with.

    Returns
    -------
    numpy.ndarray
        ``float64 [N]``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] < 2:
        return np.ones(scores.shape[0])
    top_two = -np.partition(-scores, 1, axis=1)[:, :2]
    return np.clip((top_two[:, 0] - top_two[:, 1]) / max_margin(scores.shape[1], alpha), 0.0, 1.0)

@dataclass
class ZeroShotScores:
    """Zero-shot results for N cells and K classes (rows in the order the cells were given).

    Attributes
    ----------
    classes
        Class names, the column order of every matrix.
    cell_embeddings
        ``[N, projection_dim]`` L2-normalised cell embeddings.
    similarity
        ``[N, K]`` cosine similarities.
    match_prob
        ``[N, K]`` CTM match probabilities; NaN where the fast mode did not score the pair (everywhere
        with ``alpha = 1``).
    p_sim, p_ctm, scores
        ``[N, K]``: the two softmaxes and the final score (see :func:`combine_scores`).
    fully_scored
        ``[N]`` bool: every class of the cell was scored by CTM (always in official mode; in fast mode
        when ``top_k = K`` or when ``exact_argmax`` could not certify the cell; never with ``alpha = 1``,
        where CTM's weight is 0 and it is not run).
    certified
        ``[N]`` bool: the cell's best class is certain to be the official one (``mode="official"``)
        whatever the match probabilities of the classes CTM did not score (module docstring). True
        for every fully scored cell, so always True with ``exact_argmax``; in plain fast mode the
        False rows are the cells whose answer may differ from the official one.
    """

    classes: list[str]  # class names, column order
    cell_embeddings: np.ndarray  # [N, D] float32
    similarity: np.ndarray  # [N, K] float32 cosine similarities
    match_prob: np.ndarray  # [N, K] float32, NaN where not scored
    p_sim: np.ndarray  # [N, K] float32
    p_ctm: np.ndarray  # [N, K] float32
    scores: np.ndarray  # [N, K] float32 final scores
    fully_scored: np.ndarray  # [N] bool: CTM ran for every class of the cell
    certified: np.ndarray  # [N] bool: the best class is certainly the official mode's

    @property
    def n_uncertified(self) -> int:
        """Cells whose best class may differ from the official mode's (0 with ``exact_argmax``)."""
        return int((~self.certified).sum())

    @property
    def predicted(self) -> np.ndarray:
        """Index of the best class of every cell (``int64 [N]``)."""
        return self.scores.argmax(axis=1)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _match_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probability of "match" (index 1) from CTM logits ``[..., 2]``."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]


def _greedy_groups(
    widths: torch.Tensor, units_per_item: int, budget: int, max_ratio: float = 1.25
) -> list[torch.Tensor]:
    """Split items into groups of similar width whose padded size fits a token budget.

    ``widths`` holds each item's width (tokens); an item costs ``units_per_item`` rows of that width.
    Items are sorted by width and cut greedily: a group closes before the item that would break the
    budget (``rows x widest <= budget``; a single item always fits) or that is more than ``max_ratio``
    times wider than the group's narrowest, so that padding wastes at most ~25 % of a pass.
    """
    order = torch.argsort(widths, stable=True)
    sorted_widths = widths[order].tolist()
    groups, start = [], 0
    for i in range(1, len(sorted_widths) + 1):
        if (
            i == len(sorted_widths)
            or (i - start + 1) * units_per_item * sorted_widths[i] > budget
            or sorted_widths[i] > max_ratio * max(sorted_widths[start], 1)
        ):
            groups.append(order[start:i])
            start = i
    return groups


def _trimmed_cells(states: torch.Tensor, mask: torch.Tensor, cells: torch.Tensor):
    """States and mask of ``cells``, cut to the longest of them (their padding tail is never attended)."""
    sub_mask = mask[cells]
    length = max(int(sub_mask.sum(dim=1).max()), 1)
    return states[cells, :length], sub_mask[:, :length]


def _official_match(
    model: Any,
    states: torch.Tensor,
    mask: torch.Tensor,
    classes: ClassTexts,
    max_pair_tokens: int,
) -> torch.Tensor:
    """``[B, K]`` match probabilities of every (cell, class) pair, through the all-pairs path of match_logits.

    Classes are grouped by text length (each group padded to its own longest text) under the token
    budget; each group is scored against as many cells at once as the budget allows. A cell's
    keys/values are projected once per class group (once in all when every class fits one pass).
    """
    n_cells, n_classes = states.shape[0], len(classes)
    text_lengths = classes.attention_mask.sum(dim=1)
    out = torch.empty(n_cells, n_classes, dtype=torch.float32, device=states.device)
    for rows in _greedy_groups(text_lengths, 1, max_pair_tokens):
        tokens = classes.tokens(rows)
        cells_per_pass = max(1, max_pair_tokens // tokens["input_ids"].numel())
        for start in range(0, n_cells, cells_per_pass):
            cells = torch.arange(start, min(start + cells_per_pass, n_cells), device=states.device)
            cell_states, cell_mask = _trimmed_cells(states, mask, cells)
            logits = model.match_logits(cell_states, cell_mask, tokens)  # [cells, classes, 2]
            out[cells[:, None], rows[None, :]] = _match_probabilities(logits)
    return out


def _top_k_match(
    model: Any,
    states: torch.Tensor,
    mask: torch.Tensor,
    classes: ClassTexts,
    top_classes: torch.Tensor,
    max_pair_tokens: int,
) -> torch.Tensor:
    """``[B, K]`` match probabilities for the pairs (cell b, class top_classes[b, j]); NaN elsewhere.

    The pairs go through the ``cell_index`` path of match_logits, a cell's texts side by side, so that
    each cell's cross-attention keys/values are projected once for all of its texts. Cells are grouped
    by the length of their longest selected text, so that a pass pads little.
    """
    n_cells, k = top_classes.shape
    text_lengths = classes.attention_mask.sum(dim=1)
    cell_widths = text_lengths[top_classes].max(dim=1).values
    match = torch.full((n_cells, len(classes)), float("nan"), dtype=torch.float32, device=states.device)
    for cells in _greedy_groups(cell_widths, k, max_pair_tokens):
        cells = torch.sort(cells).values
        cell_states, cell_mask = _trimmed_cells(states, mask, cells)
        rows = top_classes[cells]  # [cells, k]
        cell_index = torch.arange(cells.numel(), device=states.device).repeat_interleave(k)
        logits = model.match_logits(
            cell_states, cell_mask, classes.tokens(rows.reshape(-1)), cell_index=cell_index
        )
        match[cells[:, None], rows] = _match_probabilities(logits).view(cells.numel(), k)
    return match


def uncertified_cells(
    p_sim: torch.Tensor, match_prob: torch.Tensor, *, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """Cells whose fast prediction might differ from the official one (see the module docstring).

    Parameters
    ----------
    p_sim
        ``[B, K]`` similarity softmax.
    match_prob
        ``[B, K]`` match probabilities, NaN where not scored.
    alpha
        Weight of ``p_sim``.

    Returns
    -------
    torch.Tensor
        ``[B]`` bool: True where the best class is not certain to be the official argmax for every
        value in [0, 1] of the unscored match probabilities (ties count as uncertain).
    """
    scored = ~torch.isnan(match_prob)
    exp_match = torch.exp(torch.nan_to_num(match_prob, nan=0.0))
    scored_sum = (exp_match * scored).sum(dim=1, keepdim=True)
    n_unscored = (~scored).sum(dim=1, keepdim=True).to(p_sim.dtype)
    winners, margins = [], []
    for denominator in (scored_sum + n_unscored, scored_sum + n_unscored * math.e):
        official = alpha * p_sim + (1.0 - alpha) * exp_match / denominator
        best = torch.where(scored, official, -torch.inf).max(dim=1)
        # Highest score an unscored class could reach: its similarity part plus a match probability of 1.
        ceiling = torch.where(~scored, alpha * p_sim + (1.0 - alpha) * math.e / denominator, -torch.inf)
        # The runner-up among scored classes must be strictly lower too (a tie is not a certificate).
        runner_up = torch.where(scored, official, -torch.inf)
        runner_up = runner_up.scatter(1, best.indices[:, None], -torch.inf).max(dim=1).values
        winners.append(best.indices)
        margins.append(best.values - torch.maximum(ceiling.max(dim=1).values, runner_up))
    certified = (winners[0] == winners[1]) & (margins[0] > 0) & (margins[1] > 0)
    return ~certified


def score_batch(
    model: Any,
    batch: dict[str, torch.Tensor],
    classes: ClassTexts,
    *,
    alpha: float = DEFAULT_ALPHA,
    top_k: int = DEFAULT_TOP_K,
    mode: str = "fast",
    temperature: float = TEMPERATURE,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    exact_argmax: bool = False,
) -> dict[str, torch.Tensor]:
    """Score one padded batch of cells against the classes.

    Call under :func:`torch.inference_mode` with the model in eval mode (:func:`zero_shot_scores`
    does both).

    Parameters
    ----------
    model
        A :class:`langcell.models.LangCell`.
    batch
        ``{"input_ids", "attention_mask"}`` ``[B, L]`` tokenized cells, ``<cls>`` first.
    classes
        From :func:`encode_class_texts`.
    alpha, temperature
        As in :func:`combine_scores`.
    top_k
        Fast mode: classes per cell (by similarity) scored with CTM; clamped to K.
    mode
        ``"fast"`` or ``"official"`` (every class scored with CTM).
    max_pair_tokens
        Text tokens per multimodal pass (memory bound).
    exact_argmax
        Fast mode: score every class of the cells whose prediction is not certified (see the module
        docstring), so that the predictions equal the official ones.

    Returns
    -------
    dict of torch.Tensor
        ``cell_embeddings``, ``similarity``, ``match_prob``, ``p_sim``, ``p_ctm``, ``scores``,
        ``fully_scored`` and ``certified`` (see :class:`ZeroShotScores`).

    Notes
    -----
    Work whose weight is 0 is skipped. With ``alpha = 1`` (similarity only) CTM is not run in any
    mode: ``match_prob`` is NaN everywhere, ``p_ctm`` uniform, ``fully_scored`` False, and ``scores``
    equal ``p_sim`` exactly, as they did when CTM ran. With ``alpha = 0`` nothing can be skipped: the
    similarities choose the fast mode's ``top_k`` classes, and they cost one ``[B, D] x [D, K]``
    product next to the cell encoder whose states CTM needs anyway.
    """
    mode = _check_mode(mode)
    alpha = check_alpha(alpha)
    n_classes = len(classes)
    top_k = check_top_k(top_k, n_classes)
    device = model.logit_scale.device
    mask = torch.as_tensor(batch["attention_mask"]).to(device)
    embeddings, states = model.encode_cells(
        {"input_ids": torch.as_tensor(batch["input_ids"]), "attention_mask": mask}
    )
    # Scores are combined in float32 at every precision (bf16/int8 passes too): the similarities go through a
    # softmax at temperature 0.05, which would magnify the rounding of a low-precision product.
    embeddings = embeddings.float()
    with torch.autocast(device.type, enabled=False):
        similarity = model.similarity(embeddings, classes.embeddings.float())
    fully_scored = torch.ones(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    certified = fully_scored.clone()
    if alpha == 1.0:
        # p_ctm's weight is 0: the scores are p_sim whatever CTM says, so CTM is not run at all
        # (and every answer is the official one: certified stays True).
        match = torch.full_like(similarity, float("nan"))
        fully_scored[:] = False
    elif mode == "official":
        match = _official_match(model, states, mask, classes, max_pair_tokens)
    else:
        top_classes = torch.topk(similarity, top_k, dim=1, sorted=True).indices
        match = _top_k_match(model, states, mask, classes, top_classes, max_pair_tokens)
        fully_scored &= top_k == n_classes
        if top_k < n_classes:
            # The certificate costs [B, K] arithmetic, no model pass: computed in plain fast mode too, so
            # that the caller can say how many answers might differ from the official ones.
            p_sim = torch.softmax(similarity / temperature, dim=-1)
            certified = ~uncertified_cells(p_sim, match, alpha=alpha)
            unsure = torch.nonzero(~certified).flatten()
            if exact_argmax and unsure.numel():
                match[unsure] = _official_match(model, states[unsure], mask[unsure], classes, max_pair_tokens)
                fully_scored[unsure] = True
                certified[unsure] = True
    p_sim, p_ctm, scores = combine_scores(similarity, match, alpha=alpha, temperature=temperature)
    return {
        "fully_scored": fully_scored,
        "certified": certified,
        "cell_embeddings": embeddings,
        "similarity": similarity,
        "match_prob": match,
        "p_sim": p_sim,
        "p_ctm": p_ctm,
        "scores": scores,
    }


def zero_shot_scores(
    model: Any,
    cells: Any,
    classes: ClassTexts,
    *,
    alpha: float = DEFAULT_ALPHA,
    top_k: int = DEFAULT_TOP_K,
    mode: str = "fast",
    temperature: float = TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int | None = None,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    exact_argmax: bool = False,
    precision: str = "fp32",
    progress: bool = False,
) -> ZeroShotScores:
    """Score tokenized cells against class texts with the released zero-shot formula.

    Parameters
    ----------
    model
        A :class:`langcell.models.LangCell` (put in eval mode for the call, then restored).
    cells
        A :class:`langcell.data.tokenizer.TokenizedCells` or a sequence of 1-D token id arrays (``<cls>``
        first); sequences longer than the cell encoder's positions are truncated to them (rank order:
        the top genes are kept).
    classes
        From :func:`encode_class_texts`.
    alpha
        Weight of ``p_sim`` (0.1 in the release). At 1 the matching head is not run (its weight is 0;
        see :func:`score_batch`).
    top_k
        Fast mode: classes per cell, by similarity, that CTM scores; at least 1, clamped to K.
    mode
        ``"fast"`` (CTM for the top_k classes) or ``"official"`` (CTM for every class, the release).
    temperature
        Similarity temperature (0.05 in the release).
    max_tokens
        Cell tokens per batch (batch size x padded length); cells are grouped by length
        (:func:`langcell.data.batching.token_budget_batches`).
    max_batch_size
        Optional cap on cells per batch.
    max_pair_tokens
        Text tokens (padded) per multimodal pass; bounds the text tower's activation memory.
    exact_argmax
        Fast mode: score every class of each cell whose prediction could differ from the official
        one, so that the predictions equal ``mode="official"`` (module docstring).
    precision
        ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) or ``"int8"`` (CPU: the cell encoder's linear layers
        only) model passes (:func:`langcell.precision.inference_precision`). The scores are combined in
        float32 either way; with bf16 the embeddings carry about 3 significant digits, so near-ties may
        resolve differently from fp32 (on the trained models measured, 0-0.7% of the answers;
        BENCHMARKS.md "CPU low precision").
    progress
        Show a tqdm progress bar over cells.

    Returns
    -------
    ZeroShotScores
        Rows in the order of ``cells``.
    """
    mode = _check_mode(mode)
    precision = check_precision(precision, model.logit_scale.device)
    alpha = check_alpha(alpha)
    top_k = check_top_k(top_k, len(classes))
    if max_pair_tokens < 1:
        raise LangCellError(
            f"max_pair_tokens must be a positive number of text tokens, got {max_pair_tokens}"
        )
    if not temperature > 0:
        raise LangCellError(f"temperature must be positive, got {temperature}; the release uses 0.05")
    sequences = as_sequences(cells)
    if not sequences:
        raise LangCellError("no cells to score; pass at least one tokenized cell")
    max_positions = int(model.config.cell.max_position_embeddings)
    lengths = np.minimum(
        np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences)), max_positions
    )
    batches = token_budget_batches(lengths, max_tokens, max_batch_size=max_batch_size)
    pad_id = int(model.config.cell.pad_token_id)

    n_cells, n_classes = len(sequences), len(classes)
    out = {
        "cell_embeddings": np.empty((n_cells, int(classes.embeddings.shape[1])), dtype=np.float32),
        **{key: np.empty((n_cells, n_classes), dtype=np.float32) for key in _MATRICES},
        "fully_scored": np.empty(n_cells, dtype=bool),
        "certified": np.empty(n_cells, dtype=bool),
    }
    bar = progress_bar(n_cells, progress, f"zero-shot ({mode})", "cell")
    try:
        device = model.logit_scale.device
        int8_part = model.cell_modules()  # int8: the text tower (matching head's input) stays fp32
        with inference_precision(model, precision, device, int8_part=int8_part), torch.inference_mode(), \
                _eval_mode(model):
            for rows in batches:
                input_ids, attention_mask = pad_sequences([sequences[i] for i in rows], pad_id, max_positions)
                result = score_batch(
                    model,
                    {
                        "input_ids": torch.from_numpy(input_ids),
                        "attention_mask": torch.from_numpy(attention_mask),
                    },
                    classes,
                    alpha=alpha,
                    top_k=top_k,
                    mode=mode,
                    temperature=temperature,
                    max_pair_tokens=max_pair_tokens,
                    exact_argmax=exact_argmax,
                )
                for key, matrix in out.items():
                    value = result[key]
                    matrix[rows] = (value.float() if value.is_floating_point() else value).cpu().numpy()
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    bad = ~np.isfinite(out["scores"]).all(axis=1)
    if bad.any():
        raise LangCellError(
            f"the model gave NaN or infinite scores for {int(bad.sum())} of {n_cells} cells: its weights or "
            "settings are damaged (load it again from a good copy), or precision='fp16' overflowed (use bf16)"
        )
    return ZeroShotScores(classes=list(classes.names), **out)


_MATRICES = ("similarity", "match_prob", "p_sim", "p_ctm", "scores")
