"""refuse_unknown: the one unknown-key check behind config tables, spec files and settings."""

import pytest

from iddpm_core.checks import refuse_unknown
from iddpm_core.config import RunConfig


def test_refuse_unknown_names_the_keys_and_the_known_ones():
    refuse_unknown({"a": 1}, ("a", "b"), "t")  # nothing unknown: no error
    with pytest.raises(LookupError, match=r"^t: unknown key\(s\) \['c', 'z'\]; known keys are \['b', 'a'\]$"):
        refuse_unknown({"z": 1, "a": 2, "c": 3}, ("b", "a"), "t", LookupError)  # a tuple keeps its order
    with pytest.raises(ValueError, match=r"^unknown key\(s\) \['x'\]; known axes are \['a', 'b'\]$"):
        refuse_unknown(["x"], {"b", "a"}, what="axes")  # a set is listed sorted; no 'where' prefix


def test_run_config_refuses_an_unknown_field():
    with pytest.raises(ValueError, match=r"run config \[model\]: unknown key\(s\) \['widht'\]; known fields are"):
        RunConfig.from_dict({"model": {"widht": 3}})


def test_refuse_unknown_with_a_template_keeps_a_callers_wording():
    with pytest.raises(ValueError, match=r"^bad \['q'\] of \['a', 'b'\]$"):
        refuse_unknown({"q": 1}, {"a", "b"}, template="bad {unknown} of {known}")
