"""``overview.public`` in params.yml: public by default, ``false`` keeps the overview off the public site."""
from __future__ import annotations

import pytest

from atlas.errors import InvalidInput
from atlas.params import parse_params


def test_overviews_are_public_unless_the_slide_says_otherwise():
    assert parse_params(None).overview.public is True
    assert parse_params("stitch:\n  align_channel: 0\n").overview.public is True
    assert parse_params("overview:\n  public: false\n").overview.public is False


def test_public_must_be_true_or_false():
    with pytest.raises(InvalidInput, match=r"overview.public = 'no': input should be a valid boolean"):
        parse_params("overview:\n  public: 'no'\n")
