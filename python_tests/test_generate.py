"""Generation: KV-cache decode, left-padded batches, eos, streaming, sampling, top-p."""

import pytest
import torch

from mmkernels.models import Llama, LlamaConfig
from mmkernels.models.generation import generate, top_p_filter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Llama(cfg).eval()


def test_kv_cache_decode_equals_full_forward(model):
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 12)
        parts = [model(ids[:, :5], kv_cache=cache)]
        parts += [model(ids[:, i : i + 1], kv_cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_reset_starts_a_new_request(model):
    """reset() empties the cache: the same request run again gives the same logits and fills it again."""
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_kv_cache(2, 12)
    with torch.no_grad():
        first = model(ids, kv_cache=cache)
        cache.reset()
        again = model(ids, kv_cache=cache)
    assert cache.length == 9 and not cache.prompts
    assert torch.equal(again, first)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[5, 9, 2, 33, 7, 1, 8], [4, 4], [60, 3, 17, 9]]
    batched = generate(model, prompts, max_new_tokens=6, pad_id=0)
    alone = [generate(model, [p], max_new_tokens=6, pad_id=0)[0] for p in prompts]
    assert batched == alone


def test_stop_at_eos_and_streaming(model):
    prompts = [[5, 9, 2], [7, 1]]
    free = generate(model, prompts, max_new_tokens=5)
    eos = free[0][1]  # make the first sample stop at its second token
    steps = []
    out = generate(model, prompts, max_new_tokens=5, eos_id=eos, on_step=steps.append)
    assert out[0] == free[0][:2]
    streamed = [[s[b] for s in steps if s[b] is not None] for b in range(2)]
    assert streamed == out
    assert all(s[0] is None for s in steps[2:])
    # Several eos ids (a config's eos_token_id may be a list): each sample stops at the first it meets.
    stop = [eos, free[1][0]]
    out = generate(model, prompts, max_new_tokens=5, eos_id=stop)
    first_stop = [next(i for i, t in enumerate(f) if t in stop) for f in free]
    assert out == [f[: i + 1] for f, i in zip(free, first_stop)] and out[1] == free[1][:1]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    prompts = [[5, 9, 2], [7, 1, 3]]
    a = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    b = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b
    assert generate(model, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6) == \
        generate(model, prompts, max_new_tokens=6)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    torch.manual_seed(0)
    samples = torch.multinomial(torch.softmax(top_p_filter(logits, 0.8), -1).expand(2000, 4), 1)
    assert set(samples.flatten().tolist()) == {0, 2}


def test_top_p_filter_stops_when_the_mass_is_reached_exactly():
    """Exactly representable masses (four equal tokens, 0.25 each): top_p 0.5 keeps two tokens, not three (the
    set is the smallest that reaches top_p); 0.5 + a little keeps three."""
    logits = torch.zeros(1, 4)
    assert int(torch.isfinite(top_p_filter(logits, 0.5)).sum()) == 2
    assert int(torch.isfinite(top_p_filter(logits, 0.75)).sum()) == 3
    assert int(torch.isfinite(top_p_filter(logits, 0.51)).sum()) == 3


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive integer"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p: expected a number in"):
        top_p_filter(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match=r"prompts: token ids must be in \[0, 61\), got 61"):
        generate(model, [[1, 61]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pad_id: expected an id in \[0, 61\), got -1"):
        generate(model, [[1]], max_new_tokens=2, pad_id=-1)
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="kv_cache: 6 positions exceed the cache length max_len=4"):
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_forward_compiles_fullgraph(model):
    """No graph breaks in the model: every op is one opaque custom op with a fake impl."""
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)
        actual = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
