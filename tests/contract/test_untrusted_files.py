"""Untrusted files: weights and dictionaries a user hands us never run code.

* Weights load only through safetensors or ``torch.load(weights_only=True)``: a ``.bin`` pickle that
  carries code is refused by :func:`langcell.models.serialization.read_weights`, by :func:`langcell.convert.import_official`
  and by ``langcell import-official``, with a one-line error, and the code does not run.
* Geneformer's pickled dictionaries are read only through
  :func:`langcell.data.geneformer.read_geneformer_dictionary` (a restricted unpickler); the same holds
  through ``langcell tokenize --token-dictionary``.
* Corpus shards are ``.npy`` files read with ``allow_pickle=False``: an object array in their place is
  refused.
* A scan of the package's source fails on any other way to unpickle (``pickle.load``, ``torch.load``
  without ``weights_only=True``, ``np.load(allow_pickle=True)``, ``pandas.read_pickle``, ...).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import langcell
from langcell.cli import main
from langcell.convert import import_official
from langcell.data.corpus import TokenCorpus, write_corpus
from langcell.data.geneformer import read_geneformer_dictionary
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models.serialization import read_weights

PACKAGE = Path(langcell.__file__).resolve().parent


class Exploit:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_state_dict(marker: Path) -> dict:
    return {"weight": torch.zeros(2, 2), "bias": Exploit(marker)}


@pytest.fixture(params=["torch.save", "plain pickle"])
def evil_bin(request, tmp_path) -> tuple[Path, Path]:
    """A .bin weights file that runs code when unpickled, in torch's zip format or as a plain pickle."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.bin"
    if request.param == "torch.save":
        torch.save(evil_state_dict(marker), path)
    else:
        path.write_bytes(pickle.dumps(evil_state_dict(marker)))
    return path, marker


def test_the_exploit_works_when_unpickled_unsafely(evil_bin):
    # The fixture is a real threat: loading it the unsafe way runs the command.
    path, marker = evil_bin
    if path.read_bytes()[:2] == b"PK":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_read_weights_refuses_a_pickle_that_carries_code(evil_bin):
    path, marker = evil_bin
    with pytest.raises(LangCellError, match="refused") as error:
        read_weights(path)
    message = str(error.value)
    assert "\n" not in message and "weights_only=True" in message and "trusted source" in message
    assert "weights_only=False" not in message  # never advise the unsafe way
    assert not marker.exists()


def _release_with_evil_weights(tmp_path: Path, marker: Path) -> Path:
    """A released-checkpoint layout whose cell_bert/pytorch_model.bin carries code."""
    ckpt = tmp_path / "ckpt"
    for tower in ("cell_bert", "text_bert"):
        (ckpt / tower).mkdir(parents=True)
        (ckpt / tower / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    torch.save(evil_state_dict(marker), ckpt / "cell_bert" / "pytorch_model.bin")
    return ckpt


def test_import_official_refuses_code_in_a_bin(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = _release_with_evil_weights(tmp_path, marker)
    with pytest.raises(LangCellError, match="refused"):
        import_official(
            ckpt, tmp_path / "out", text_tokenizer_dir=tmp_path / "vocab",
            token_dictionary=tmp_path / "t.pkl", gene_median_dictionary=tmp_path / "m.pkl",
        )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_import_official_refuses_code_in_one_line(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    ckpt = _release_with_evil_weights(tmp_path, marker)
    code = main([
        "import-official", str(ckpt), str(tmp_path / "out"), "--text-tokenizer", str(tmp_path / "vocab"),
        "--token-dictionary", str(tmp_path / "t.pkl"), "--gene-median-dictionary", str(tmp_path / "m.pkl"),
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("langcell import-official: error: ")
    assert "refused" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_tokenize_refuses_code_in_a_geneformer_dictionary(tmp_path, capsys):
    import anndata as ad

    marker = tmp_path / "code_ran"
    (tmp_path / "token_dictionary.pkl").write_bytes(
        pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": Exploit(marker)})
    )
    (tmp_path / "gene_median_dictionary.pkl").write_bytes(pickle.dumps({"ENSG00000000003": 1.0}))
    adata = ad.AnnData(np.ones((2, 1), dtype=np.float32))
    adata.var_names = ["ENSG00000000003"]
    adata.write_h5ad(tmp_path / "in.h5ad")
    code = main([
        "tokenize", str(tmp_path / "in.h5ad"), str(tmp_path / "corpus"),
        "--token-dictionary", str(tmp_path / "token_dictionary.pkl"),
        "--gene-median-dictionary", str(tmp_path / "gene_median_dictionary.pkl"),
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("langcell tokenize: error: ")
    assert "refused" in err and "posix.system is not allowed" in err
    assert not marker.exists() and not (tmp_path / "corpus").exists()


def test_a_dictionary_with_a_builtin_call_is_refused(tmp_path):
    # Not only os.system: any global (here builtins.eval) is refused before it is called.
    class Eval:
        def __reduce__(self):
            return (eval, (f"__import__('pathlib').Path({str(tmp_path / 'code_ran')!r}).touch()",))

    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000003": Eval()}))
    with pytest.raises(LangCellError, match="builtins.eval is not allowed"):
        read_geneformer_dictionary(path)
    assert not (tmp_path / "code_ran").exists()


def test_a_corpus_shard_holding_pickled_objects_is_refused(tmp_path):
    import anndata as ad

    adata = ad.AnnData(np.array([[1, 2, 0], [0, 3, 1]], dtype=np.float32))
    adata.var_names = ["a", "b", "c"]
    tokenizer = GeneTokenizer(["a", "b", "c"], [1.0, 1.0, 1.0], gene_id_kind="custom")
    write_corpus(adata, tokenizer, tmp_path / "corpus", progress=False)
    marker = tmp_path / "code_ran"
    shard = tmp_path / "corpus" / "shards" / "shard_00000.ids.npy"
    np.save(shard, np.array([Exploit(marker)], dtype=object), allow_pickle=True)
    # Make the manifest agree with the new file, so that only the pickle check stands in the way.
    manifest_path = tmp_path / "corpus" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["files"]["ids"]["bytes"] = shard.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(LangCellError, match="cannot read"):
        TokenCorpus(tmp_path / "corpus")
    assert not marker.exists()


# ------------------------------------------------------------------------------------- source scan
ALLOWED_UNPICKLERS = {("geneformer.py", "_DictionaryUnpickler")}  # read_geneformer_dictionary's restricted one
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Every way ``source`` could unpickle untrusted data, as ``file:line: what``."""
    problems = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, tail = name.rpartition(".")
            if head.split(".")[-1] in PICKLE_MODULES and tail in {"load", "loads", "Unpickler", "open"}:
                problems.append(f"{where}: {name}(...)")
            elif tail == "read_pickle":
                problems.append(f"{where}: {name}(...)")
            elif name == "torch.load" or name.endswith(".torch.load"):
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: {name}(...) without weights_only=True")
            elif tail == "load" and head.split(".")[-1] in {"np", "numpy"}:
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{where}: {name}(..., allow_pickle=...) may unpickle")
        elif isinstance(node, ast.ClassDef):
            bases = [_dotted(b) for b in node.bases]
            if any(b.rpartition(".")[2] == "Unpickler" for b in bases):
                if (Path(filename).name, node.name) not in ALLOWED_UNPICKLERS:
                    problems.append(f"{where}: class {node.name}({', '.join(bases)})")
        elif isinstance(node, ast.ImportFrom) and (node.module in PICKLE_MODULES or node.module == "torch"):
            # A bare load() after these imports would escape the checks above.
            imported = {alias.name for alias in node.names}
            if imported & {"load", "loads", "Unpickler"}:
                problems.append(f"{where}: from {node.module} import {sorted(imported)}")
    return problems


def test_the_scan_finds_unsafe_loads():
    # The scanner itself must catch each form it is meant to catch (else the next test proves nothing).
    samples = {
        "import pickle\npickle.load(f)": 1,
        "import pickle\npickle.loads(b)": 1,
        "import torch\ntorch.load(p)": 1,
        "import torch\ntorch.load(p, weights_only=False)": 1,
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)": 0,
        "import numpy as np\nnp.load(p, allow_pickle=True)": 1,
        "import numpy as np\nnp.load(p, allow_pickle=False)": 0,
        "import pandas as pd\npd.read_pickle(p)": 1,
        "import pickle\nclass U(pickle.Unpickler): pass": 1,
        "from pickle import loads": 1,
        "import joblib\njoblib.load(p)": 1,
        "from torch import load": 1,
        "import json\njson.load(f)": 0,
    }
    for source, expected in samples.items():
        assert len(unsafe_loads(source, "x.py")) == expected, source


def test_the_package_unpickles_only_through_the_documented_reader():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10 and (PACKAGE / "data" / "geneformer.py") in files
    problems = [p for file in files for p in unsafe_loads(file.read_text(encoding="utf-8"), str(file))]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)
    # ...and the documented reader is still there, with its restricted unpickler.
    tokenizer_source = (PACKAGE / "data" / "geneformer.py").read_text(encoding="utf-8")
    assert "class _DictionaryUnpickler(pickle.Unpickler)" in tokenizer_source
    assert "def find_class" in tokenizer_source
