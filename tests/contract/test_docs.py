"""Shared parameter docs (langcell._docs) and the docstrings of the public API."""

from __future__ import annotations

import inspect

import pytest

import langcell
from langcell import evaluation, tl
from langcell._docs import PARAMETER_DOCS, fill_docstring


def test_a_placeholder_becomes_the_shared_entry_indented_like_it():
    doc = "Title.\n\n    Parameters\n    ----------\n    x\n        An x.\n    {progress}\n    y\n        A y.\n"
    filled = fill_docstring(doc, {"progress": "progress\n    Show progress bars."})
    assert "    progress\n        Show progress bars.\n    y\n" in filled
    assert PARAMETER_DOCS["progress"].splitlines()[0] in fill_docstring(doc)
    assert "{progress}" not in filled
    # other braces (dict literals in prose) are left alone
    assert fill_docstring("a {name: text} dict\n") == "a {name: text} dict\n"


def test_an_unknown_placeholder_is_an_error():
    with pytest.raises(KeyError, match="no_such_entry"):
        fill_docstring("    {no_such_entry}\n")


@pytest.mark.parametrize("module", [tl, evaluation], ids=["tl", "evaluation"])
def test_public_functions_have_filled_numpydoc_docstrings(module):
    for name in module.__all__:
        function = getattr(module, name)
        doc = inspect.getdoc(function)
        assert doc and "Parameters\n----------" in doc, name
        for key in PARAMETER_DOCS:
            assert "{" + key + "}" not in doc, (name, key)
        # every keyword the function takes is documented
        documented = doc.split("Returns\n-------")[0]
        for parameter in inspect.signature(function).parameters:
            assert parameter in documented, (name, parameter)


def test_the_flat_api_names_resolve_to_documented_objects():
    for name in langcell.__all__:
        if name == "__version__":
            continue
        assert inspect.getdoc(getattr(langcell, name)), name
