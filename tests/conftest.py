"""Fixtures shared by the unit tests. The environment (TLAMA_DATA_DIR, TIKTOKEN_CACHE_DIR pointing at
../shared/data) is set by the repository's top-level conftest.py, so no test touches the network."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder (../shared/data beside the checkout, or $TLAMA_DATA_DIR)."""
    path = Path(os.environ.get("TLAMA_DATA_DIR", "")).expanduser()
    if not os.environ.get("TLAMA_DATA_DIR") or not path.is_dir():
        pytest.skip("offline data not found: put shared/data beside the checkout or set TLAMA_DATA_DIR "
                    "(see shared/data/README.md)")
    return path
