import param_monitor


def test_package_imports() -> None:
    assert param_monitor.__doc__
