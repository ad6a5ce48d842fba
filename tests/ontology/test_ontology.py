"""Tests for langcell.ontology: term texts, CELLxGENE descriptions, and label -> Cell Ontology resolution.

Expected texts are rebuilt here from the ontology parser's own label / definition / synonyms / parents,
so the tests check the templates, not a frozen copy of one ontology release.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cellxgene_ontology_guide.ontology_parser import OntologyParser

from langcell import ontology
from langcell.errors import LangCellError

SHARED = Path(__file__).resolve().parents[3] / "shared"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"


@pytest.fixture(scope="module")
def parser() -> OntologyParser:
    """An independent parser (not langcell's cached one) to compute expectations."""
    return OntologyParser()


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith(".") else text + "."


# --------------------------------------------------------------------------------------- term_text


def test_cell_type_text_for_b_cell_is_built_from_the_ontology(parser):
    term = "CL:0000236"
    label = parser.get_term_label(term)
    definition = _sentence(parser.get_term_description(term))
    parent_labels = [parser.get_term_label(p) for p in parser.get_term_parents(term)]
    text = ontology.term_text(term)
    assert label == "B cell"
    assert text.startswith(f"cell type: {label}. {definition} Also called: ")
    assert text.endswith(f" A kind of: {', '.join(parent_labels[:2])}.")
    # "B lymphocyte" is kept; "B-cell" / "B-lymphocyte" differ from what is already said only by hyphens.
    synonyms = text.split("Also called: ")[1].split(". A kind of")[0].split(", ")
    assert synonyms == ["B lymphocyte"]
    assert set(synonyms) <= set(parser.get_term_synonyms(term))


def test_synonym_and_parent_limits(parser):
    term = "CL:0000784"  # plasmacytoid dendritic cell: many synonyms
    all_synonyms = parser.get_term_synonyms(term)
    text = ontology.term_text(term, max_synonyms=1, max_parents=0)
    assert f"Also called: {all_synonyms[0]}." in text
    assert all_synonyms[1] not in text
    assert "A kind of" not in text
    bare = ontology.term_text(term, max_synonyms=0, max_parents=0)
    assert bare == f"cell type: {parser.get_term_label(term)}. {_sentence(parser.get_term_description(term))}"


def test_immgen_codes_are_not_used_as_synonyms(parser):
    term = "CL:0000895"  # naive CD4 T cell; CL lists the ImmGen code "T.4Nve.Sp" as a synonym
    assert "T.4Nve.Sp" in parser.get_term_synonyms(term)
    assert "T.4Nve.Sp" not in ontology.term_text(term, max_synonyms=10)


@pytest.mark.parametrize(
    ("aspect", "term", "prefix", "with_definition", "parent_lead"),
    [
        ("tissue", "UBERON:0000178", "tissue", True, "Belongs to"),
        ("disease", "MONDO:0005148", "disease", True, "A kind of"),
        ("development_stage", "HsapDv:0000258", "development stage", True, None),
        ("assay", "EFO:0009922", "assay", True, "A kind of"),
        ("self_reported_ethnicity", "HANCESTRO:0005", "self-reported ethnicity", True, None),
        ("tissue", "CL:0000236", "tissue", True, "Belongs to"),  # cell cultures use CL terms as tissue
    ],
)
def test_aspect_templates_use_label_definition_and_parents(
    parser, aspect, term, prefix, with_definition, parent_lead
):
    text = ontology.term_text(term, aspect)
    label = parser.get_term_label(term)
    assert text.startswith(f"{prefix}: {label}. ")
    if with_definition:
        assert _sentence(parser.get_term_description(term)) in text
    if parent_lead:
        parents = ", ".join(parser.get_term_label(p) for p in parser.get_term_parents(term)[:2])
        assert text.endswith(f" {parent_lead}: {parents}.")


def test_disease_text_names_mondo_synonyms(parser):
    text = ontology.term_text("MONDO:0005148", "disease")
    assert "Also called: NIDDM, T2D, T2DM." in text
    assert set(parser.get_term_synonyms("MONDO:0005148")[:3]) == {"NIDDM", "T2D", "T2DM"}


def test_sex_and_organism_texts(parser):
    assert ontology.term_text("PATO:0000383", "sex") == f"sex: {parser.get_term_label('PATO:0000383')}."
    assert ontology.term_text("PATO:0000384", "sex") == "sex: male."
    assert ontology.term_text("NCBITaxon:9606", "organism") == "organism: Homo sapiens. Also called: human."
    assert ontology.term_text("NCBITaxon:10090", "organism") == (
        "organism: Mus musculus. Also called: house mouse, mouse."
    )


@pytest.mark.parametrize("aspect", ontology.ASPECTS)
@pytest.mark.parametrize("value", ["unknown", "na", " unknown "])
def test_unknown_and_na_give_no_text(aspect, value):
    assert ontology.term_text(value, aspect) == ""


def test_special_values_with_meaning(parser):
    normal = ontology.term_text("PATO:0000461", "disease")
    assert normal == ontology.SPECIAL_TEXTS[("disease", "PATO:0000461")]
    assert normal.startswith("disease: normal.")
    assert ontology.term_text("multiethnic", "self_reported_ethnicity").startswith(
        "self-reported ethnicity: multiethnic."
    )
    both = ontology.term_text("HANCESTRO:0005,HANCESTRO:0014", "self_reported_ethnicity")
    expected_labels = " and ".join(parser.get_term_label(t) for t in ("HANCESTRO:0005", "HANCESTRO:0014"))
    assert both == f"self-reported ethnicity: {expected_labels}."


def test_term_text_rejects_a_term_of_the_wrong_ontology():
    with pytest.raises(LangCellError, match=r"'UBERON:0000178' is not a valid cell_type term id.*CL"):
        ontology.term_text("UBERON:0000178", "cell_type")
    with pytest.raises(LangCellError, match=r"disease takes terms of MONDO, PATO"):
        ontology.term_text("CL:0000236", "disease")
    with pytest.raises(LangCellError, match="not a valid cell_type term id"):
        ontology.term_text("B cell", "cell_type")


def test_term_text_rejects_an_unknown_id_and_aspect():
    with pytest.raises(LangCellError, match="'CL:9999999' is not a term of CL"):
        ontology.term_text("CL:9999999")
    with pytest.raises(LangCellError, match="unknown aspect 'celltype'"):
        ontology.term_text("CL:0000236", "celltype")
    with pytest.raises(LangCellError, match="must be strings"):
        ontology.term_text(236)  # type: ignore[arg-type]


def test_deprecated_term_names_its_replacement(parser):
    assert parser.is_term_deprecated("CL:0000003")
    replacement = parser.get_term_replacement("CL:0000003")
    with pytest.raises(LangCellError, match=rf"deprecated in CL; replace it with {replacement} \('cell'\)"):
        ontology.term_text("CL:0000003")


def test_deprecated_term_without_replacement_lists_the_terms_to_consider(parser):
    assert (
        parser.is_term_deprecated("HsapDv:0000087") and parser.get_term_replacement("HsapDv:0000087") is None
    )
    with pytest.raises(LangCellError, match=r"deprecated in HsapDv; replace it with one of HsapDv:0000226"):
        ontology.term_text("HsapDv:0000087", "development_stage")


# ----------------------------------------------------------------------------------- describe_cells


def _small_obs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_type_ontology_term_id": pd.Categorical(
                ["CL:0000236", "CL:0000623", "unknown", "CL:0000236"]
            ),
            "tissue_ontology_term_id": ["UBERON:0000178"] * 4,
            "disease_ontology_term_id": ["PATO:0000461", "MONDO:0005148", "PATO:0000461", None],
            "sex_ontology_term_id": pd.Categorical(
                ["PATO:0000383", "PATO:0000384", "unknown", "PATO:0000383"]
            ),
            "organism_ontology_term_id": ["NCBITaxon:9606"] * 4,
            "self_reported_ethnicity_ontology_term_id": ["HANCESTRO:0005", "multiethnic", "unknown", "na"],
            "author_label": ["B", "NK", "?", "B"],
        },
        index=[f"cell{i}" for i in range(4)],
    )


def test_describe_cells_gives_one_column_per_present_aspect():
    obs = _small_obs()
    texts = ontology.describe_cells(obs)
    assert list(texts.columns) == [
        "cell_type",
        "tissue",
        "disease",
        "sex",
        "organism",
        "self_reported_ethnicity",
    ]
    assert texts.index.equals(obs.index)
    for aspect in texts.columns:
        for cell, value in obs[f"{aspect}_ontology_term_id"].items():
            expected = "" if value is None else ontology.term_text(value, aspect)
            assert texts.loc[cell, aspect] == expected
    assert texts.loc["cell2", "cell_type"] == ""
    assert texts.loc["cell3", "disease"] == ""  # a missing value is "no text"


def test_describe_cells_missing_columns_skipped_or_strict():
    obs = _small_obs()
    assert list(ontology.describe_cells(obs, aspects=("cell_type", "assay")).columns) == ["cell_type"]
    with pytest.raises(LangCellError, match=r"'assay_ontology_term_id'.*CELLxGENE"):
        ontology.describe_cells(obs, aspects=("cell_type", "assay"), strict=True)
    with pytest.raises(LangCellError, match="unknown aspect"):
        ontology.describe_cells(obs, aspects=("cell type",))


def test_describe_cells_names_the_column_of_a_bad_term():
    obs = _small_obs()
    obs["sex_ontology_term_id"] = ["female", "PATO:0000384", "unknown", "PATO:0000383"]
    with pytest.raises(
        LangCellError, match=r"column 'sex_ontology_term_id': 'female' is not a valid sex term"
    ):
        ontology.describe_cells(obs, aspects=("sex",))


def test_describe_cells_ignores_unused_categories():
    values = pd.Categorical(["CL:0000236"], categories=["CL:0000236", "CL:9999999"])
    texts = ontology.describe_cells(pd.DataFrame({"cell_type_ontology_term_id": values}))
    assert texts["cell_type"].tolist() == [ontology.term_text("CL:0000236")]


class _CountingParser:
    """Wraps a parser and counts, per term id, the calls that read one term's description."""

    def __init__(self, inner: OntologyParser):
        self._inner = inner
        self.description_calls: Counter[str] = Counter()

    def get_term_description(self, term_id):
        self.description_calls[term_id] += 1
        return self._inner.get_term_description(term_id)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("categorical", [True, False])
def test_describe_cells_describes_each_unique_term_once(monkeypatch, parser, categorical):
    counting = _CountingParser(parser)
    monkeypatch.setattr(ontology.texts, "ontology_parser", lambda: counting)
    # term_text itself is counted too: its own cache would hide a per-cell loop from the parser count.
    term_text_calls: Counter[str] = Counter()
    real_term_text = ontology.term_text

    def counting_term_text(term_id, aspect="cell_type", **kwargs):
        term_text_calls[term_id] += 1
        return real_term_text(term_id, aspect, **kwargs)

    monkeypatch.setattr(ontology.texts, "term_text", counting_term_text)
    ontology.texts._term_text_cached.cache_clear()
    try:
        rng = np.random.default_rng(0)
        terms = ["CL:0000236", "CL:0000623", "CL:0000084", "unknown"]
        values = rng.choice(terms, size=20_000)
        column = pd.Categorical(values) if categorical else values
        texts = ontology.describe_cells(pd.DataFrame({"cell_type_ontology_term_id": column}))
    finally:
        ontology.texts._term_text_cached.cache_clear()
    assert term_text_calls == Counter({term: 1 for term in terms})
    assert counting.description_calls == Counter({"CL:0000236": 1, "CL:0000623": 1, "CL:0000084": 1})
    expected = {term: real_term_text(term) for term in terms}
    assert texts["cell_type"].tolist() == [expected[v] for v in values]


def test_cell_description_joins_the_aspects_in_order():
    obs = _small_obs()
    row = obs.iloc[0]
    text = ontology.cell_description(row)
    parts = [
        ontology.term_text("CL:0000236"),
        ontology.term_text("UBERON:0000178", "tissue"),
        ontology.term_text("PATO:0000461", "disease"),
        ontology.term_text("PATO:0000383", "sex"),
        ontology.term_text("NCBITaxon:9606", "organism"),
        ontology.term_text("HANCESTRO:0005", "self_reported_ethnicity"),
    ]
    assert text == " ".join(parts)
    as_dict = {"cell_type_ontology_term_id": "unknown", "sex_ontology_term_id": "PATO:0000384"}
    assert ontology.cell_description(as_dict) == "sex: male."
    assert ontology.cell_description(obs.iloc[3], aspects=("disease",)) == ""


# ----------------------------------------------------------------------------------- resolve_labels

EXPECTED_LABELS = {
    # CBMC author labels (the file's own CELLxGENE terms are checked separately below)
    "CD14+ Mono": "CL:0001054",
    "CD16+ Mono": "CL:0002396",
    "NK": "CL:0000623",
    "B": "CL:0000236",
    "CD4 T": "CL:0000624",
    "CD8 T": "CL:0000625",
    "CD34+": "CL:0008001",
    "DC": "CL:0000451",
    "pDC": "CL:0000784",
    "Mk": "CL:0000556",
    "Eryth": "CL:0000232",
    # pbmc68k_reduced bulk_labels
    "CD14+ Monocyte": "CL:0001054",
    "CD4+/CD25 T Reg": "CL:0000792",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
    "CD4+/CD45RO+ Memory": "CL:0001204",
    "CD8+ Cytotoxic T": "CL:0000794",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD19+ B": "CL:0001201",
    "CD56+ NK": "CL:0000623",
    "Dendritic": "CL:0000451",
    # other common spellings
    "NK cells": "CL:0000623",
    "B cells": "CL:0000236",
    "T cells": "CL:0000084",
    "Megakaryocytes": "CL:0000556",
    "FCGR3A+ Monocytes": "CL:0002396",
    "Plasma cells": "CL:0000786",
    "Treg": "CL:0000815",
    "Tregs": "CL:0000815",
    "HSPC": "CL:0008001",
    "HSC": "CL:0000037",
    "naive B cells": "CL:0000788",
    "Naive CD4+ T": "CL:0000895",
    "CD8+ T cells": "CL:0000625",
    "CD56dim CD16+ NK": "CL:0000939",
    "CL:0000236": "CL:0000236",
    "B cell": "CL:0000236",
    "natural killer cell": "CL:0000623",
    "mature NK T cell, mouse": "CL:0000814",
}


@pytest.mark.parametrize(("label", "term_id"), sorted(EXPECTED_LABELS.items()))
def test_each_known_label_resolves(label, term_id):
    table = ontology.resolve_labels([label])
    assert table.columns.tolist() == ["label", "term_id", "term_label", "how"]
    assert table.loc[0, "term_id"] == term_id


def test_how_names_the_rule_and_term_label_is_the_ontologys(parser):
    labels = ["CL:0000236", "natural killer cell", "pDC", "CD14+ Mono", "B cells"]
    table = ontology.resolve_labels(labels)
    assert table["label"].tolist() == labels
    assert table["how"].tolist() == ["term id", "exact label", "synonym", "normalised", "normalised"]
    assert table["term_label"].tolist() == [parser.get_term_label(t) for t in table["term_id"]]
    assert "pDC" in parser.get_term_synonyms(table.loc[2, "term_id"])


def test_pbmc68k_bulk_labels_all_resolve():
    sc = pytest.importorskip("scanpy")
    labels = list(sc.datasets.pbmc68k_reduced().obs["bulk_labels"].cat.categories)
    assert len(labels) == 10
    table = ontology.resolve_labels(labels)
    assert dict(zip(table["label"], table["term_id"], strict=True)) == {
        label: EXPECTED_LABELS[label] for label in labels
    }


def test_cbmc_labels_equal_the_files_own_terms():
    if not CBMC.exists():
        pytest.skip(f"shared data folder missing ({CBMC}); the CBMC check needs it")
    import anndata

    obs = anndata.read_h5ad(CBMC, backed="r").obs
    truth = obs.groupby("author_cell_type", observed=True)["cell_type_ontology_term_id"].agg(set)
    not_cell_types = {"Mouse", "Unknown"}
    assert truth["Mouse"] == {"unknown"} and truth["Unknown"] == {"unknown"}
    labels = [label for label in truth.index if label not in not_cell_types]
    assert len(labels) == 11
    table = ontology.resolve_labels(labels)
    for label, term_id in zip(table["label"], table["term_id"], strict=True):
        assert truth[label] == {term_id}, label
    for label in sorted(not_cell_types):
        with pytest.raises(
            LangCellError, match=rf"'{label}' is a placeholder or exclusion label, not a cell type"
        ):
            ontology.resolve_labels([label])


def test_unmatched_label_lists_candidates_and_the_fix():
    with pytest.raises(LangCellError) as caught:
        ontology.resolve_labels(["B cells", "Macrophags", "Mouse"])
    message = str(caught.value)
    assert message.startswith("2 of 3 labels could not be resolved")
    assert "'Macrophags' matches no CL term; closest: " in message
    assert "'macrophage' (CL:0000235)" in message
    assert "mapping={label: 'CL:...'}" in message and "JSON/TSV" in message
    closest = message.split("closest: ")[1].split(";")[0]
    assert 1 <= closest.count("(CL:") <= 5


def test_ambiguous_label_lists_the_tied_terms_instead_of_guessing():
    with pytest.raises(
        LangCellError, match=r"'CD4\+ CD8\+ T' is ambiguous: it matches .*CL:0000624.*CL:0000625"
    ):
        ontology.resolve_labels(["CD4+ CD8+ T"])


def test_marker_only_label_without_a_lineage_is_refused_with_candidates():
    with pytest.raises(LangCellError, match=r"'CD16\+' matches no CL term; closest: .*CL:0002532"):
        ontology.resolve_labels(["CD16+"])


def test_duplicated_or_empty_labels_are_refused():
    with pytest.raises(LangCellError, match="duplicated"):
        ontology.resolve_labels(["B", "NK", "B"])
    with pytest.raises(LangCellError, match="no labels"):
        ontology.resolve_labels([])
    with pytest.raises(LangCellError, match="not one string"):
        ontology.resolve_labels("B cells")
    with pytest.raises(LangCellError, match="non-empty strings"):
        ontology.resolve_labels(["B", float("nan")])


def test_user_mapping_dict_overrides_everything():
    table = ontology.resolve_labels(["B", "Mouse", "NK"], mapping={"B": "CL:0000785", "Mouse": "CL:0000000"})
    assert table["term_id"].tolist() == ["CL:0000785", "CL:0000000", "CL:0000623"]
    assert table["how"].tolist() == ["user mapping", "user mapping", "normalised"]


def test_user_mapping_from_json_and_tsv_files(tmp_path):
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"Weird cells": "CL:0000576"}))
    as_tsv = tmp_path / "map.tsv"
    as_tsv.write_text("# label\tterm\nWeird cells\tCL:0000576\n")
    for path in (as_json, str(as_tsv)):
        table = ontology.resolve_labels(["Weird cells", "B"], mapping=path)
        assert table["term_id"].tolist() == ["CL:0000576", "CL:0000236"]
        assert table.loc[0, "how"] == "user mapping"


def test_bad_user_mappings_are_refused(tmp_path):
    with pytest.raises(LangCellError, match="not a CL term id"):
        ontology.resolve_labels(["B"], mapping={"B": "UBERON:0000178"})
    with pytest.raises(LangCellError, match="deprecated term 'CL:0000003'.*CL:0000000"):
        ontology.resolve_labels(["B"], mapping={"B": "CL:0000003"})
    with pytest.raises(LangCellError, match="does not exist"):
        ontology.resolve_labels(["B"], mapping=tmp_path / "missing.json")
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("B\tCL:0000236\textra\n")
    with pytest.raises(LangCellError, match="line 1 has 3 tab-separated fields"):
        ontology.resolve_labels(["B"], mapping=bad_tsv)


def test_other_ontologies_get_exact_and_normalised_matching():
    table = ontology.resolve_labels(["lung", "Lungs", "UBERON:0000178"], ontology="UBERON")
    assert table["term_id"].tolist() == ["UBERON:0002048", "UBERON:0002048", "UBERON:0000178"]
    assert table["how"].tolist() == ["exact label", "normalised", "term id"]
    with pytest.raises(LangCellError, match="cannot resolve labels into ontology 'NCBITaxon'"):
        ontology.resolve_labels(["human"], ontology="NCBITaxon")


# --------------------------------------------------------------------------------------- label_texts


def test_label_texts_resolves_then_describes():
    texts, table = ontology.label_texts(["CD14+ Mono", "NK"])
    assert list(texts) == ["CD14+ Mono", "NK"]
    assert texts["CD14+ Mono"] == ontology.term_text("CL:0001054")
    assert texts["NK"] == ontology.term_text("CL:0000623")
    assert table["term_id"].tolist() == ["CL:0001054", "CL:0000623"]


def test_user_descriptions_override_and_skip_resolution(tmp_path):
    own = {"Mouse": "A mouse cell spiked into the human sample.", "NK": "  My own   NK text. "}
    texts, table = ontology.label_texts(["Mouse", "NK", "B"], descriptions=own)
    assert texts == {
        "Mouse": own["Mouse"],
        "NK": "My own NK text.",
        "B": ontology.term_text("CL:0000236"),
    }
    assert table["how"].tolist() == ["user description", "user description", "normalised"]
    assert table["term_id"].isna().tolist() == [True, True, False]
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(own))
    texts_from_file, _ = ontology.label_texts(["Mouse", "NK"], descriptions=path)
    assert texts_from_file["Mouse"] == own["Mouse"]
    mapped, mapped_table = ontology.label_texts(["Odd"], mapping={"Odd": "CL:0000576"})
    assert mapped["Odd"] == ontology.term_text("CL:0000576")
    assert mapped_table.loc[0, "how"] == "user mapping"
    with pytest.raises(LangCellError, match="empty"):
        ontology.label_texts(["NK"], descriptions={"NK": "  "})


# ---------------------------------------------------------------------------------------- ORGANISMS


@pytest.mark.slow
def test_organism_table_agrees_with_ncbitaxon():
    """The shortcut table must say what NCBITaxon says (checked in a subprocess: NCBITaxon takes ~3 GB)."""
    script = (
        "import json, sys\n"
        "from cellxgene_ontology_guide.ontology_parser import OntologyParser\n"
        "terms = OntologyParser().cxg_schema.ontology('NCBITaxon')\n"
        "ids = json.loads(sys.argv[1])\n"
        "print(json.dumps({i: [terms[i]['label'], terms[i].get('synonyms', [])] for i in ids}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(ontology.ORGANISMS))],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    taxonomy = json.loads(result.stdout)
    for term_id, (label, synonyms) in ontology.ORGANISMS.items():
        ncbi_label, ncbi_synonyms = taxonomy[term_id]
        assert label == ncbi_label, term_id
        assert {s.lower() for s in synonyms} <= {s.lower() for s in ncbi_synonyms}, term_id


def test_term_label_names_known_terms_and_is_empty_for_unknown_ids():
    assert ontology.term_label("CL:0000236") == "B cell"
    assert ontology.term_label("UBERON:0000178") == "blood"
    assert ontology.term_label("CL:9999999") == ""
    assert ontology.term_label("not a term") == ""


def test_annotation_classes_and_their_resolution_lines():
    from langcell.ontology.classes import annotation_classes, resolution_lines

    names, texts, table, aspect = annotation_classes(None, ["B cells", "CL:0000623"], None, None, None)
    assert names == ["B cells", "CL:0000623"] and aspect == "cell_type" and len(texts) == 2
    lines = resolution_lines(table)
    assert lines[0].startswith("B cells -> CL:0000236 (B cell) [")
    assert lines[1] == "CL:0000623 -> CL:0000623 (natural killer cell) [term id]"
    _, texts, table, _ = annotation_classes(None, {"killers": "a lymphocyte  that kills"}, None, None, None)
    assert texts == ["a lymphocyte that kills"]
    assert resolution_lines(table) == ["killers -> free text, no term [user description]"]
