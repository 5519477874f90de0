"""Tensor parallelism: 2 CPU processes (gloo) holding halves of the FFN and attention weights give
the same outputs and gradients as the unsharded modules."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlama_mini import Attention, FeedForward, TlamaConfig, compute_freqs_cis
from tlama_mini import parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        torch.manual_seed(0)
        dense = FeedForward(16, 48, exact=True, use_parallel=False)
        cfg = TlamaConfig(d_model=16, n_heads=4, n_kv_heads=2, max_seq_len=8, max_batch_size=2, use_parallel=False)
        dense_att = Attention(cfg)
        x = torch.randn(2, 5, 16)
        parallel.init_tensor_parallel()
        tp = FeedForward(16, 48, exact=True, use_parallel=True)
        tp_att = Attention(cfg.replace(use_parallel=True))
        assert isinstance(tp.w1, parallel.ColumnParallelLinear) and tp_att.n_local_heads == 2

        def shard(dst, src, dim):
            dst.weight.data.copy_(src.weight.data.chunk(world, dim)[rank])

        for name in ("w1", "w3"):
            shard(getattr(tp, name), getattr(dense, name), 0)
        shard(tp.w2, dense.w2, 1)
        for name in ("Wq", "Wk", "Wv"):
            shard(getattr(tp_att, name), getattr(dense_att, name), 0)
        shard(tp_att.Wo, dense_att.Wo, 1)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(tp(xa), dense(xb), atol=1e-6, rtol=1e-5)
        tp(xa).square().sum().backward()
        dense(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tp.w1.weight.grad, dense.w1.weight.grad.chunk(world, 0)[rank], atol=1e-5, rtol=1e-5)
        freqs = compute_freqs_cis(4, 5)
        torch.testing.assert_close(tp_att(x, 0, freqs, None, is_causal=True),
                                   dense_att(x, 0, freqs, None, is_causal=True), atol=1e-5, rtol=1e-5)
    except Exception as e:  # report to the parent instead of hanging
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
    finally:
        parallel._TP_GROUP = None
        if dist.is_initialized():
            dist.destroy_process_group()


def test_tensor_parallel_equals_dense():
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), errors), nprocs=2, join=True, start_method="spawn")
    assert errors.empty(), errors.get()


def test_without_a_group_linears_are_plain():
    ffn = FeedForward(8, 16, exact=True, use_parallel=True)
    assert type(ffn.w1) is torch.nn.Linear and parallel.tp_world_size() == 1
