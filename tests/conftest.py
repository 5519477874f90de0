"""Fixtures shared by the unit tests. Tests find data files the way the package does
(`tlama_mini.paths.find_data_file`: the small files ship inside the package), so no test needs the
network or anything beside the checkout."""
import pytest


@pytest.fixture(scope="module")
def module_token_cache(tmp_path_factory):
    """Encoded corpora go to a temporary cache shared by one test module, not the user's (subprocesses
    inherit the variable). Use with `pytestmark = pytest.mark.usefixtures("module_token_cache")`."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TLAMA_TOKEN_CACHE", str(tmp_path_factory.mktemp("tokens")))
        yield
