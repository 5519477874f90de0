"""tlama_mini.memory.PeakMemory counts exactly the bytes torch allocates inside its block, frees
included, and ignores views and tensors made before the block."""
import pytest
import torch

from tlama_mini.memory import PeakMemory, peak_memory


def test_peak_counts_live_bytes_and_frees():
    before = torch.empty(1000)  # made outside: not counted

    def work():
        a = torch.empty(250_000)            # 1 MB
        view = a[10:].view(-1, 10)          # a view: no new memory
        del a, view
        b = torch.empty(500_000)            # 2 MB, after the 1 MB was freed
        c = b + 1                           # 2 MB more: peak 4 MB
        del c
        return b.sum() + before.sum()

    with PeakMemory() as m:
        work()
    assert m.peak == 4_000_000              # the scalars (sums) come after c was freed
    assert m.live == 0                      # everything made inside was freed
    assert peak_memory(work) == m.peak


def test_views_of_tensors_made_before_are_not_counted():
    big = torch.arange(1_000_000)                  # 8 MB, made outside
    with PeakMemory() as m:
        part = big[10:20][None]                    # views: no new memory
        y = part * 2                               # 80 bytes
    assert m.peak == y.untyped_storage().nbytes() == 80


def test_backward_activations_are_counted():
    x = torch.randn(256, 256, requires_grad=True)
    kept = peak_memory(lambda: torch.exp(x).sum().backward())  # exp's output is saved for the backward
    assert kept >= 2 * 256 * 256 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak():
    assert peak_memory(lambda: torch.empty(1 << 20, device="cuda"), "cuda") >= 4 << 20
