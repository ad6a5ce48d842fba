"""The flat public API: every advertised name resolves."""

import langcell


def test_every_public_name_resolves():
    for name in langcell.__all__:
        assert getattr(langcell, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        langcell.no_such_thing  # noqa: B018
