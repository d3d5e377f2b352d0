"""transformers' common tests are collected only when selected (`-m transformers_common`, make test-transformers):
importing them registers our classes in transformers' name tables, and transformers marks some of its own tests
`slow`, which `make test-slow` would then pick up."""


def pytest_ignore_collect(collection_path, config):
    return "transformers_common" not in (config.getoption("-m") or "")
