import shyped


def test_version_is_exposed() -> None:
    assert shyped.__version__.count(".") == 2
