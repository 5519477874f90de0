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


@pytest.fixture(scope="module")
def module_token_cache(tmp_path_factory):
    """Encoded corpora go to a temporary cache shared by one test module, not the user's (subprocesses
    inherit the variable). Use with `pytestmark = pytest.mark.usefixtures("module_token_cache")`."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TLAMA_TOKEN_CACHE", str(tmp_path_factory.mktemp("tokens")))
        yield
