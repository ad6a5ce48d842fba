"""Tests for langcell.data.soma: a SOMA experiment (the CELLxGENE Census's format) as corpus input.

The experiment is built in a temporary directory from two h5ad files of real cells with
``tiledbsoma.io.from_h5ad`` (one experiment, the second file appended with a registration mapping, as
Census-like experiments hold many datasets over the union of their genes). The corpus written from it
must equal the corpus written from the same h5ad files, cell for cell, token for token, obs for obs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tiledbsoma  # the test extra installs it: these tests must run in CI
import tiledbsoma.io

from langcell.cli import main
from langcell.cli.build import tokenize_sources
from langcell.data.corpus import write_corpus
from langcell.data.datasets import pbmc68k
from langcell.data.soma import SomaSource, census_uri, default_config, is_soma_uri
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError

SHARED = Path(__file__).resolve().parents[3] / "shared"
IMMUNE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"

pytestmark = pytest.mark.skipif(
    not IMMUNE.is_file(), reason=f"shared data not found at {SHARED} (clone the project beside ../shared)"
)
BLOOD_PRIMARY = "tissue_general == 'blood' and is_primary_data == True"


def _cellxgene_files(directory: Path) -> list[Path]:
    """Two small h5ad files of real cells with the same CELLxGENE-schema obs columns (the Census's too)."""
    pbmc = pbmc68k()[:260].copy()
    pbmc.obs["is_primary_data"] = True
    pbmc.obs["tissue_general"] = pd.Categorical(["blood"] * pbmc.n_obs)
    immune = ad.read_h5ad(IMMUNE)[:170].copy()
    immune.var_names_make_unique()
    immune.obs["n_counts"] = np.asarray(immune.X.sum(axis=1)).ravel().astype(np.float64)
    for column in pbmc.obs.columns[1:]:
        if isinstance(pbmc.obs[column].dtype, pd.CategoricalDtype):
            immune.obs[column] = pd.Categorical(["unknown"] * immune.n_obs)
    immune.obs["organism_ontology_term_id"] = pd.Categorical(["NCBITaxon:9606"] * immune.n_obs)
    immune.obs["tissue_general"] = pd.Categorical(["blood"] * immune.n_obs)
    # Secondary data (CELLxGENE's word for cells also published elsewhere): the filter leaves them out.
    immune.obs["is_primary_data"] = False
    immune.obs = immune.obs[pbmc.obs.columns]
    paths = [directory / "pbmc.h5ad", directory / "immune.h5ad"]
    for adata, path in zip((pbmc, immune), paths, strict=True):
        adata.uns = {}
        adata.write_h5ad(path)
    return paths


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[str, list[Path]]:
    """A local SOMA experiment holding both files (X layer 'raw', measurement 'RNA', as in the Census)."""
    directory = tmp_path_factory.mktemp("soma")
    paths = _cellxgene_files(directory)
    uri = str(directory / "experiment")
    names = [str(p) for p in paths]
    tiledbsoma.io.from_h5ad(uri, names[0], "RNA", X_layer_name="raw", ingest_mode="schema_only")
    mapping = tiledbsoma.io.register_h5ads(
        uri, names, measurement_name="RNA", obs_field_name="obs_id", var_field_name="var_id"
    )
    mapping.prepare_experiment(uri)
    for name in names:
        tiledbsoma.io.from_h5ad(uri, name, "RNA", X_layer_name="raw", registration_mapping=mapping)
    return uri, paths


@pytest.fixture(scope="module")
def tokenizer(experiment) -> GeneTokenizer:
    return GeneTokenizer.fit(experiment[1], gene_id_kind="ensembl")


def _assert_same_corpus(soma_corpus, h5ad_corpus, uri: str) -> None:
    assert len(soma_corpus) == len(h5ad_corpus) > 0
    np.testing.assert_array_equal(soma_corpus.lengths, h5ad_corpus.lengths)
    for i in range(len(h5ad_corpus)):
        np.testing.assert_array_equal(soma_corpus[i], h5ad_corpus[i])
    assert soma_corpus.tokenizer == h5ad_corpus.tokenizer
    soma_obs, h5ad_obs = soma_corpus.obs, h5ad_corpus.obs
    assert list(soma_obs.columns) == list(h5ad_obs.columns)
    assert (soma_obs["source_file"] == uri).all()
    for column in h5ad_obs.columns.drop("source_file"):
        np.testing.assert_array_equal(
            soma_obs[column].to_numpy(dtype=object), h5ad_obs[column].to_numpy(dtype=object), err_msg=column
        )


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_corpus_from_soma_equals_corpus_from_the_h5ad_files(experiment, tokenizer, tmp_path):
    uri, paths = experiment
    # Chunks of 64 cells and shards of 100 cells straddle the border between the two datasets.
    options = {"chunk_size": 64, "shard_size": 100, "max_length": 512, "progress": False}
    from_h5ad = write_corpus(paths, tokenizer, tmp_path / "from_h5ad", **options)
    from_soma = write_corpus(SomaSource(uri), tokenizer, tmp_path / "from_soma", **options)
    assert len(from_soma) == 260 + 170
    _assert_same_corpus(from_soma, from_h5ad, uri)
    entry = from_soma.manifest["sources"][0]
    assert entry["source"] == uri and entry["x_layer"] == "raw" and entry["obs_filter"] is None
    # The vocabulary fitted on the experiment is the one fitted on the files.
    assert GeneTokenizer.fit(SomaSource(uri), gene_id_kind="ensembl") == tokenizer


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_obs_filter_selects_the_same_cells_as_the_h5ad_subset(experiment, tokenizer, tmp_path):
    uri, paths = experiment
    blood_primary = write_corpus(
        SomaSource(uri, obs_filter=BLOOD_PRIMARY), tokenizer, tmp_path / "blood", max_length=512, progress=False
    )
    _assert_same_corpus(blood_primary, write_corpus(paths[0], tokenizer, tmp_path / "pbmc", max_length=512,
                                                    progress=False), uri)
    # A filter that picks cells here and there in both datasets, against the same subsets in memory.
    subsets = [ad.read_h5ad(p) for p in paths]
    subsets = [a[a.obs["n_counts"].to_numpy() > 2500].copy() for a in subsets]
    expected = write_corpus(subsets, tokenizer, tmp_path / "subsets", chunk_size=50, progress=False)
    selected = write_corpus(
        SomaSource(uri, obs_filter="n_counts > 2500"), tokenizer, tmp_path / "high", chunk_size=50, progress=False
    )
    assert 0 < len(selected) < 430
    _assert_same_corpus(selected, expected, uri)


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_obs_columns_are_read_and_kept_as_from_h5ad(experiment, tokenizer, tmp_path):
    uri, paths = experiment
    kept = ["cell_type_ontology_term_id", "tissue_general"]
    from_h5ad = write_corpus(paths, tokenizer, tmp_path / "h", obs_columns=kept, max_length=256, progress=False)
    from_soma = write_corpus(SomaSource(uri), tokenizer, tmp_path / "s", obs_columns=kept, max_length=256,
                             progress=False)
    assert list(from_soma.obs.columns) == [*kept, "source_file", "obs_name"]
    _assert_same_corpus(from_soma, from_h5ad, uri)
    with pytest.raises(LangCellError, match=r"has no obs columns \['tissue'\]"):
        write_corpus(SomaSource(uri), tokenizer, tmp_path / "x", obs_columns=["tissue"], progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"uri": "/nonexistent/experiment"}, ["no SOMA experiment at '/nonexistent/experiment'"]),
        ({"obs_filter": "n_counts < 0"}, ["has no cell that obs_filter 'n_counts < 0' selects"]),
        ({"obs_filter": "tissue == 'blood'"}, ["names obs columns ['tissue']", "tissue_general"]),
        ({"obs_filter": "tissue_general == "}, ["is not a valid filter"]),
        ({"x_layer": "data"}, ["no X layer 'data'", "'raw'", "x_layer"]),
        ({"measurement": "ATAC"}, ["no measurement 'ATAC'", "'RNA'"]),
    ],
)
def test_bad_soma_inputs_fail_before_writing(experiment, tokenizer, tmp_path, options, words):
    source = SomaSource(**{"uri": experiment[0], **options})
    out = tmp_path / "corpus"
    with pytest.raises(LangCellError) as error:
        write_corpus(source, tokenizer, out, progress=False)
    for word in words:
        assert word in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_a_corpus_larger_than_the_disk_is_refused_before_writing(experiment, tokenizer, tmp_path):
    uri, paths = experiment
    free = shutil.disk_usage(tmp_path).free
    for source in (SomaSource(uri), paths):
        with pytest.raises(LangCellError, match=r"the corpus needs up to .* GB \(\d+ bytes\) on the disk of"):
            write_corpus(source, tokenizer, tmp_path / "corpus", keep_free=free, progress=False)
        assert list(tmp_path.iterdir()) == []
    # The bound it states holds: the real corpus is no larger.
    corpus = write_corpus(paths, tokenizer, tmp_path / "corpus", progress=False)
    with pytest.raises(LangCellError) as error:
        write_corpus(paths, tokenizer, tmp_path / "again", keep_free=free, progress=False)
    needed = int(str(error.value).split("GB (")[1].split(" bytes")[0])
    written = sum(f.stat().st_size for f in (tmp_path / "corpus").rglob("*") if f.is_file())
    assert written <= needed and len(corpus) == 430


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_without_tiledbsoma_the_error_names_the_extra(experiment, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # what `import tiledbsoma` meets when it is absent
    with pytest.raises(LangCellError, match=r'pip install "langcell\[census\]"'):
        write_corpus(SomaSource(experiment[0]), tokenizer, tmp_path / "corpus", progress=False)


@pytest.mark.slow  # builds a SOMA experiment (~10 s on the 2-core CPU) and writes corpora
def test_cli_tokenizes_an_experiment_and_names_its_flags(experiment, tokenizer, tmp_path, capsys):
    uri, paths = experiment
    tokenizer.save(tmp_path / "tok")
    common = ["--tokenizer", str(tmp_path / "tok"), "--max-length", "512", "--quiet"]
    assert main(["tokenize", uri, str(tmp_path / "c"), "--obs-filter", BLOOD_PRIMARY, *common]) == 0
    assert main(["tokenize", str(paths[0]), str(tmp_path / "h"), *common]) == 0
    from langcell.data.corpus import TokenCorpus

    _assert_same_corpus(TokenCorpus(tmp_path / "c"), TokenCorpus(tmp_path / "h"), uri)
    capsys.readouterr()
    cases = [
        ([uri, "--obs-filter", "tissue == 'blood'"], "fix the --obs-filter"),
        ([uri, "--x-layer", "counts"], "as --x-layer"),
        ([uri, "--measurement", "ATAC"], "--measurement <one of them>"),
        ([str(paths[0]), "--obs-filter", BLOOD_PRIMARY], "--obs-filter apply to SOMA experiments"),
        ([str(tmp_path / "missing_experiment")], "neither an h5ad file nor a SOMA experiment"),
    ]
    for arguments, words in cases:
        assert main(["tokenize", arguments[0], str(tmp_path / "bad"), *arguments[1:], *common]) == 2
        message = capsys.readouterr().err
        assert words in message and message.count("\n") == 1, message
        assert not (tmp_path / "bad").exists()


def test_census_uri_and_what_the_cli_makes_of_it():
    """Everything up to the network: the URI of a release, its S3 settings, the CLI's reading of it."""
    uri = census_uri("2025-11-08")
    assert uri == "s3://cellxgene-census-public-us-west-2/cell-census/2025-11-08/soma/census_data/homo_sapiens"
    assert census_uri("2025-11-08", "mus_musculus").endswith("/census_data/mus_musculus")
    assert is_soma_uri(uri) and not is_soma_uri("cells.h5ad")
    config = default_config(uri)
    if "AWS_ACCESS_KEY_ID" not in __import__("os").environ:
        assert config["vfs.s3.no_sign_request"] == "true"
    assert default_config("/local/experiment") == {}
    from langcell.cli import build_parser

    args = build_parser().parse_args(["tokenize", uri, "corpus", "--obs-filter", BLOOD_PRIMARY])
    assert tokenize_sources(args) == [SomaSource(uri, obs_filter=BLOOD_PRIMARY)]
    with pytest.raises(LangCellError, match="release tag"):
        census_uri("")
