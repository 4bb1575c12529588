import pytest

from laformer.errors import LaFormerError
from laformer.extras import MissingExtraError, require


def test_require_returns_the_module():
    assert require("json", "train", "reports").dumps([1]) == "[1]"


def test_missing_module_names_the_extra():
    with pytest.raises(MissingExtraError, match=r'pip install "laformer\[serve\]"') as info:
        require("laformer_no_such_module", "serve", "laformer serve")
    assert isinstance(info.value, LaFormerError)
    assert "laformer serve needs" in str(info.value)
