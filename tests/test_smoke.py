import fastsched


def test_import():
    assert fastsched.__version__
