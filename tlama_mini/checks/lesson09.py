"""Checks for lesson 09 (KV cache and generation). Each check_<name>(fn) calls the learner's fn on
fresh random inputs, compares with tlama_mini (`KVCache.update`, `top_k_filter`, `top_p_filter`,
`generate`), and names the mistake when it can."""
from __future__ import annotations

import torch

from ..config import TlamaConfig
from ..kv_cache import KVCache
from ..model import Transformer
from ..sample import generate, top_k_filter, top_p_filter
from .common import ExerciseFailed, attributes_stubs, call, check_tensor, check_unchanged, fail, passed

__all__ = ["check_cache_update", "check_top_k_filter", "check_top_p_filter", "check_sample_loop"]

NEG_INF = float("-inf")


def _filtered(name: str, fn, logits: torch.Tensor, arg: float, hint: str) -> object:
    """fn(a copy of logits, arg), failing if fn wrote into that copy: the filters must return a new tensor.
    A crash inside fn is reported with `hint`."""
    given = logits.clone()
    out = call(name, fn, given, arg, hint=hint)
    check_unchanged(name, given, logits, "the input `logits`",
                    "use logits.masked_fill(drop, float('-inf')) (no trailing underscore: masked_fill_ and "
                    "logits[drop] = ... write into the caller's tensor), or work on logits.clone()")
    return out


@attributes_stubs
def check_cache_update(fn) -> None:
    """fn(cache_k, cache_v, xk, xv, start_pos) writes xk/xv (B, T, K, D) into the buffers
    (B_max, S_max, K, D) at positions start_pos.. and returns the keys and values of positions
    0..start_pos+T-1 of the first B rows: two tensors (B, start_pos + T, K, D)."""
    name = "cache_update"
    B_max, S_max, K, D = 4, 32, 2, 8
    B = int(torch.randint(2, B_max, ()))                  # fewer rows than the buffer holds, and more than 1 (a
    #                                                       batch of 1 would broadcast into every buffer row)
    start_pos = int(torch.randint(6, 12, ()))             # some positions are already cached
    T = int(torch.randint(2, 6, ()))                      # < start_pos + 1: the wrong shapes differ
    ref = KVCache(B_max, S_max, K, D)
    ref.allocate(B_max, S_max)                             # the learner's buffers: (B_max, S_max, K, D)
    past_k, past_v = torch.randn(B, start_pos, K, D), torch.randn(B, start_pos, K, D)
    ref.update(0, past_k, past_v)                          # the prefill that came before
    cache_k, cache_v = ref.cache_k.clone(), ref.cache_v.clone()
    before_k = ref.cache_k.clone()
    xk, xv = torch.randn(B, T, K, D), torch.randn(B, T, K, D)
    exp_k, exp_v = (t.clone() for t in ref.update(start_pos, xk, xv))

    out = call(name, fn, cache_k, cache_v, xk, xv, start_pos,
               hint=f"the buffers have B_max = {B_max} rows, this batch B = xk.shape[0] = {B}: write into the first "
               "B rows and T = xk.shape[1] positions, cache_k[:B, start_pos:start_pos + T] = xk")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a pair (keys, values)", "return keys, values")
    keys, values = out
    for label, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            fail(name, f"{label} is a {type(t).__name__}, expected a torch.Tensor")
        if t.shape == cache_k.shape:
            fail(name, f"{label} is the whole buffer {tuple(t.shape)}, expected the filled prefix "
                 f"{tuple(exp_k.shape)}", "return cache_k[:B, :start_pos + T]: the rows in use and the "
                 "positions written so far (the zeros after them would get attention weight)")
        if t.shape == (B_max, start_pos + T, K, D) and B < B_max:
            fail(name, f"{label} has all {B_max} buffer rows, expected the batch's {B}",
                 "slice the batch too: cache_k[:B, :start_pos + T] with B = xk.shape[0]")
        if t.shape == xk.shape:
            fail(name, f"{label} has shape {tuple(t.shape)}: only the new positions",
                 "return the past positions as well: attention needs all keys 0..start_pos+T-1")
        if t.shape == (B, start_pos + 1, K, D):
            fail(name, f"{label} has start_pos + 1 = {start_pos + 1} positions, expected start_pos + T = "
                 f"{start_pos + T}: this call brings T = xk.shape[1] = {T} new tokens, not 1 (one token per "
                 "call holds only for decode steps; a prompt or a chunk brings several)",
                 "return cache_k[:B, :start_pos + T] with T = xk.shape[1]")
    written_at_0 = before_k.clone()
    written_at_0[:B, :T] = xk
    mistakes = {"the new keys are written at position 0 instead of start_pos":
                written_at_0[:B, :start_pos + T]}
    diff = check_tensor(name + " (keys)", keys, exp_k, atol=0, rtol=0, mistakes=mistakes)
    check_tensor(name + " (values)", values, exp_v, atol=0, rtol=0,
                 hint="write xv into cache_v, like xk into cache_k")
    for label, buf, want in (("cache_k", cache_k, ref.cache_k), ("cache_v", cache_v, ref.cache_v)):
        if not torch.equal(buf[B:], want[B:]):
            fail(name, f"{label} was written in rows {B}..{B_max - 1}, which this batch of B = {B} does not use "
                 "(they may belong to other sequences)", "write into the first B rows only: "
                 "cache_k[:B, start_pos:start_pos + T] = xk with B = xk.shape[0]")
        if not torch.equal(buf[:B, start_pos + T:], want[:B, start_pos + T:]):
            fail(name, f"{label} was written past position start_pos + T - 1 = {start_pos + T - 1}",
                 "write exactly the T = xk.shape[1] new positions: cache_k[:B, start_pos:start_pos + T] = xk")
    if not torch.equal(cache_k, ref.cache_k) or not torch.equal(cache_v, ref.cache_v):
        fail(name, "the buffers cache_k / cache_v were not updated in place",
             "assign into a slice of the buffer (cache_k[:B, start_pos:start_pos + T] = xk) so the next "
             "step finds these keys; `cache_k = ...` only rebinds a local name")
    # one decode step after that: the next position, one token
    xk1, xv1 = torch.randn(B, 1, K, D), torch.randn(B, 1, K, D)
    exp_k1, _ = ref.update(start_pos + T, xk1, xv1)
    keys1, _ = call(name + " (a decode step after it)", fn, cache_k, cache_v, xk1, xv1, start_pos + T,
                    hint="a decode step brings T = 1 new position at start_pos")
    check_tensor(name + " (a decode step after it)", keys1, exp_k1, atol=0, rtol=0)
    passed(name, f"max abs diff {diff:.1e}; B={B}, start_pos={start_pos}, T={T}, then one decode step")


@attributes_stubs
def check_top_k_filter(fn) -> None:
    """fn(logits, k): logits (B, V) -> (B, V) with all but the k largest of each row set to -inf."""
    name = "top_k_filter"
    B, V = 3, int(torch.randint(10, 30, ()))
    k = int(torch.randint(2, 6, ()))
    logits = torch.randn(B, V) * 2
    out = _filtered(name, fn, logits, k, hint=f"kth = logits.topk(k, dim=-1).values[:, -1:] is each row's k-th largest "
                    f"logit, shape (B, 1): over the last dim (the vocabulary; k = {k} may exceed B = {B}), and with "
                    "the dim kept so that it broadcasts against (B, V)")
    if isinstance(out, torch.Tensor) and out.shape == (B, k):
        fail(name, f"returned shape {(B, k)}: only the top-k values (or indices)",
             "keep the full (B, V) row and set the other logits to -inf, so softmax gives them 0")
    kth = torch.topk(logits, k + 1, dim=-1).values
    mistakes = {
        "kept k + 1 tokens (compare with the k-th largest using `<`, and keep the k-th itself)":
            logits.masked_fill(logits < kth[:, -1:], NEG_INF),
        "kept k - 1 tokens (the k-th largest must be kept: drop only logits < the k-th)":
            logits.masked_fill(logits <= kth[:, k - 1:k], NEG_INF),
        "the dropped logits are set to 0 instead of -inf (softmax of 0 is not 0)":
            logits.masked_fill(logits < kth[:, k - 1:k], 0.0),
        "the kept and dropped tokens are swapped (keep the k *largest*)":
            logits.masked_fill(logits >= kth[:, k - 1:k], NEG_INF),
        "the top k are chosen over the batch dimension (use dim=-1)":
            logits.masked_fill(logits < torch.topk(logits, min(k, B), dim=0).values[-1:], NEG_INF),
    }
    diff = check_tensor(name, out, top_k_filter(logits, k), atol=0, rtol=0, mistakes=mistakes)
    kept = torch.isfinite(out).sum(-1)
    if not torch.equal(kept, torch.full((B,), k)):
        fail(name, f"kept {kept.tolist()} tokens per row, expected {k}")
    passed(name, f"max abs diff {diff:.1e} on random logits with V={V}, k={k}")


def _top_p_mistakes(logits: torch.Tensor, p: float) -> dict[str, torch.Tensor]:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)

    def unsort(drop_sorted: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), NEG_INF)

    unsorted_cum = torch.cumsum(torch.softmax(logits, -1), -1)
    return {
        "the token that crosses p is dropped: keep tokens until the total *reaches* p, including the "
        "one that gets it there (drop a token only when the mass *before* it is already >= p)":
            unsort(cum > p),
        "the probabilities are accumulated in vocabulary order: sort them in descending order first":
            logits.masked_fill(unsorted_cum - torch.softmax(logits, -1) >= p, NEG_INF),
        "the kept and dropped tokens are swapped": unsort(cum - probs < p),
    }


def _which_tokens(name: str, out: object, expected: torch.Tensor, logits: torch.Tensor) -> None:
    """A wrong filter of the right shape: compare *which* tokens each row keeps (the finite entries), as sets,
    instead of the values (a kept -inf against a finite logit differs by 3.4e38, which says nothing)."""
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return
    got, want = torch.isfinite(out), torch.isfinite(expected)  # (B, V) kept tokens
    if torch.equal(got, want):
        return  # the right tokens, other values: the generic message stands
    b = int((got != want).any(-1).nonzero()[0])
    sets = (f"row {b} keeps tokens {got[b].nonzero().flatten().tolist()}, expected "
            f"{want[b].nonzero().flatten().tolist()}")
    n = want.sum(-1, keepdim=True)  # (B, 1) tokens to keep per row
    first_n = torch.arange(logits.shape[-1]) < n  # the first n vocabulary positions of each row
    if torch.equal(got, first_n):
        fail(name, f"{sets}: the right number of tokens, but always the first ones of the vocabulary. The "
             "keep/drop decision was made in sorted order and applied to the unsorted logits (or the sorted "
             "logits were returned): put it back in vocabulary order first",
             "drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), with order from torch.sort")
    if torch.equal(got.sum(-1), want.sum(-1)):
        fail(name, f"{sets}: the right number of tokens per row, but not the most likely ones",
             "decide in sorted order, then scatter the decision back with the order torch.sort returned")
    fail(name, f"{sets}: it keeps {got.sum(-1).tolist()} tokens per row, expected {want.sum(-1).tolist()}",
         "drop a token when the probability mass of the more likely tokens before it is already >= p")


@attributes_stubs
def check_top_p_filter(fn) -> None:
    """fn(logits, p): logits (B, V) -> (B, V); keep the smallest set of most likely tokens whose total
    probability reaches p (always at least one), set the rest to -inf."""
    name = "top_p_filter"
    B, V = 4, int(torch.randint(12, 30, ()))
    p = float(torch.empty(()).uniform_(0.45, 0.9))
    # logits in [-1, 1] with V >= 12: no token has probability above e / (e + 11 / e) = 0.40 < p
    logits = torch.empty(B, V).uniform_(-1, 1)
    hint = ("sort descending, softmax, cumsum; drop a token when the probability mass before it is already "
            ">= p; scatter back to vocabulary order")
    empty_msg = ("when the most likely token alone has probability > p, no token is kept (softmax of an all "
                 "-inf row is NaN)", "always keep the most likely token: drop a token only when the mass "
                 "*before* it is >= p, which is 0 for the first one")

    def no_empty_rows(out: object) -> None:
        if isinstance(out, torch.Tensor) and out.shape == logits.shape and not torch.isfinite(out).any(-1).all():
            fail(name, *empty_msg)

    crash_hint = ("sort descending, softmax, cumsum, drop_sorted = (cumsum - probs) >= p (bool, in sorted order); "
                  "back to vocabulary order with torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted) "
                  "(scatter needs the same dtype on both sides); then logits.masked_fill(drop, float('-inf'))")
    out = _filtered(name, fn, logits, p, crash_hint)
    expected = top_p_filter(logits, p)
    try:
        diff = check_tensor(name, out, expected, atol=0, rtol=0, mistakes=_top_p_mistakes(logits, p), hint=hint)
    except ExerciseFailed as e:
        if "known mistake" not in str(e):
            no_empty_rows(out)
            _which_tokens(name, out, expected, logits)
        raise
    confident = torch.randn(B, V)
    confident[torch.arange(B), torch.randint(0, V, (B,))] = 12.0  # the top token alone has probability > p
    out = _filtered(name, fn, confident, p, crash_hint)
    no_empty_rows(out)
    check_tensor(name + " (a confident distribution)", out, top_p_filter(confident, p), atol=0, rtol=0, hint=hint)
    check_tensor(name + " (p=1.0)", _filtered(name, fn, logits, 1.0, crash_hint), top_p_filter(logits, 1.0),
                 atol=0, rtol=0)
    passed(name, f"max abs diff {diff:.1e} on random logits with V={V}, p={p:.2f}")


@attributes_stubs
def check_sample_loop(fn) -> None:
    """fn(model, tokens, n): greedy generation of n tokens with the KV cache; model in eval mode;
    tokens (B, T) -> (B, T + n). Must equal tlama_mini.generate(model, tokens, n, temperature=0)."""
    name = "sample_loop"
    cfg = TlamaConfig.from_preset("tiny", vocab_size=int(torch.randint(20, 60, ())), max_seq_len=48,
                                  d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    B, T, n = 2, int(torch.randint(3, 8, ())), int(torch.randint(4, 8, ()))
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    expected = generate(model, tokens, n, temperature=0)

    calls: list[tuple[int, int, object]] = []  # (length fed, start_pos, kv_cache) of every forward
    shapes: list[tuple[int, ...]] = []          # the shape of the tokens fed at every forward

    def record(_module, args, kwargs):
        toks = args[0] if args else kwargs["tokens"]
        start = args[1] if len(args) > 1 else kwargs.get("start_pos", 0)
        shapes.append(tuple(toks.shape) if isinstance(toks, torch.Tensor) else ())
        if isinstance(toks, torch.Tensor) and toks.dim() == 2:
            calls.append((toks.shape[1], int(start), kwargs.get("kv_cache", None)))

    def check_decode_calls() -> None:
        decode = calls[1:]
        if any(length > 1 for length, _, _ in decode):
            fail(name, f"after the prefill the model was fed {[c[0] for c in decode]} tokens per step: the whole "
                 "sequence again", "with the cache, feed only the newest token: model(next_token[:, None], start_pos)")
        got_pos = [s for _, s, _ in decode]
        want_pos = list(range(T, T + len(decode)))
        if got_pos != want_pos:
            if got_pos and all(s == 0 for s in got_pos):
                problem = "every decode step used start_pos=0, which overwrites the cache at position 0"
            elif got_pos and got_pos == [s + 1 for s in want_pos]:
                problem = "start_pos is one too large (the first new token sits at position T, right after the prompt)"
            elif got_pos and got_pos == [s - 1 for s in want_pos]:
                problem = "start_pos is one too small: it overwrites the last prompt position"
            else:
                problem = f"decode steps used start_pos {got_pos}, expected {want_pos}"
            fail(name, problem, "the token generated at step i (0-based) is fed at start_pos = T + i")

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = call(name, fn, model, tokens.clone(), n,
                       hint="logits, _ = model(tokens, start_pos): the model returns a pair (logits (B, T, V), loss); "
                       "feed it int64 tokens of shape (B, T), a decode step's token as (B, 1): next_token[:, None]")
    except ExerciseFailed as failed:
        bad = [s for s in shapes if len(s) != 2]
        if bad:
            fail(name, f"the model was fed tokens of shape {bad[0]}; it takes (B, T) token ids, so a single new token "
                 f"per row is (B, 1) = ({B}, 1)", "model(next_token[:, None], start_pos): argmax(-1) drops the "
                 "vocabulary dim and leaves (B,); add the time dim back (or argmax(-1, keepdim=True))")
        crash = failed.__context__  # the learner's exception, when `call` turned a crash into the failure
        if isinstance(crash, ValueError) and "would leave a gap" in str(crash):
            first = calls[0] if calls else None
            if first is not None and first[1] == 0 and first[2] is not True:
                fail(name, "the prefill model(tokens, 0) ran without a cache (a plain forward allocates none), so "
                     "the first decode step found no keys to attend to",
                     "prefill with model(tokens, 0, kv_cache=True): it fills a cache sized to the prompt")
            check_decode_calls()
            fail(name, f"a decode step left a gap in the cache: {crash}",
                 "the token generated at step i (0-based) is fed at start_pos = T + i")
        raise
    finally:
        handle.remove()
        model.reset_cache()
    if not isinstance(out, torch.Tensor):
        fail(name, f"returned {type(out).__name__}, expected a tensor (B, T + n)", "did you forget a `return`?")
    if out.shape == (B, n):
        fail(name, f"returned shape {tuple(out.shape)}: only the new tokens",
             "return the prompt followed by the new tokens: torch.cat([tokens, new], dim=1)")
    if not calls:
        fail(name, "the model was never called (note: model.forward(...) bypasses the check's hooks)",
             "call model(tokens, 0, kv_cache=True) for the prompt, then model(token[:, None], start_pos) "
             "for each new token")
    if calls[0][1] != 0 or calls[0][0] != T:
        fail(name, f"the first call fed {calls[0][0]} tokens at start_pos={calls[0][1]}; expected the whole "
             f"prompt ({T} tokens) at start_pos=0 (the prefill)")
    if any(kv is False for _, _, kv in calls):
        fail(name, "the model was called with kv_cache=False: the cache is never used",
             "prefill with model(tokens, 0, kv_cache=True), then model(token[:, None], start_pos), so each "
             "layer reads and writes its cache")
    check_decode_calls()
    decode = calls[1:]
    if len(decode) not in (n - 1, n):
        fail(name, f"{len(decode)} decode calls for n={n} new tokens; expected {n - 1} (or {n})")
    check_tensor(name, out, expected, atol=0, rtol=0,
                 hint="take the argmax of the logits at the *last* position: logits[:, -1].argmax(-1)")
    passed(name, f"{n} greedy tokens equal tlama_mini.generate(temperature=0); calls: prefill of {T}, "
           f"then {len(decode)} single-token steps")
