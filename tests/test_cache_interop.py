"""A task memory as a transformers Cache: model(...) and model.generate(...) read it like a KV cache.

The references are emloc's own answering path (the adapter drives the layers with PrefixPlan,
no Cache object, no transformers mask) and, for method="full", the model's own forward on the
uncompressed sequence. Tiny random models, fp32.
"""
import copy
import os

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, TextIteratorStreamer, TextStreamer

import emloc
from emloc.serving.answering import Sampler, generate_batch
from tiny_models import chat_tokenizer, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
DEMOS = [{"input": f"review {i}: the movie was {'great' if i % 3 else 'terrible'}",
          "output": "positive" if i % 3 else "negative"} for i in range(8)]
QUERIES = ["great plot", "terrible boring movie and actors", "the house"]  # different lengths
CONTINUATION = "positive review"


def compressed(family, attn="sdpa", method="emloc"):
    model = tiny_model(family, n_layers=3, std=0.2, seed=7)
    model.set_attn_implementation(attn)
    comp = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=4, method=method, progress=False)
    return comp, comp.compress(DEMOS, system="Classify.")


@pytest.fixture(scope="module", params=FAMILIES)
def family_memory(request):
    comp, memory = compressed(request.param)
    assert len(set(memory.layer_lengths)) > 1  # ragged: the per-layer lengths differ
    return comp, memory


@pytest.fixture(scope="module")
def llama_memory():
    return compressed("llama")


def snapshot(memory):
    return [(l.keys.clone(), l.values.clone(), l.keys.data_ptr()) for l in memory.layers]


def assert_bit_identical(memory, snap):
    for layer, (k, v, ptr) in zip(memory.layers, snap):
        assert layer.keys.data_ptr() == ptr
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def emloc_tokens(comp, memory, queries, max_new_tokens):
    """Greedy ids per query from emloc's own decode loop (stopping at the end-of-turn token)."""
    rows = [comp.renderer.query(q) for q in queries]
    with comp.adapter.emloc_attention():
        return generate_batch(comp.adapter, memory, rows, comp._stop_ids(), comp.pad_id,
                              max_new_tokens, Sampler(), "auto")


def hf_generate(comp, memory, queries, **kwargs):
    inputs = comp.query_inputs(memory, queries)
    with emloc.routed(comp.model), torch.no_grad():
        out = comp.model.generate(**inputs, eos_token_id=sorted(comp._stop_ids()),
                                  pad_token_id=comp.pad_id, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def trim(ids, stop, pad_id):
    """Row ids up to and including the first stop token (generate pads finished rows)."""
    out = []
    for t in ids.tolist():
        out.append(t)
        if t in stop:
            break
    return out


# -- plain forward --------------------------------------------------------------------------
def test_forward_logits_equal_emloc_logits(family_memory):
    """Left-padded batch, multi-token rows (query + continuation), explicit position_ids."""
    comp, memory = family_memory
    cont = comp.renderer.text_ids(CONTINUATION)
    inputs = comp.query_inputs(memory, QUERIES)
    ids = torch.cat([inputs["input_ids"], torch.tensor([cont] * len(QUERIES))], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(QUERIES), len(cont), dtype=torch.long)], dim=1)
    positions = torch.cat([inputs["position_ids"], inputs["position_ids"][:, -1:] + 1 + torch.arange(len(cont))], 1)
    cache = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
    with emloc.routed(comp.model), torch.no_grad():
        logits = comp.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache).logits.float()
    for b, query in enumerate(QUERIES):
        expected = comp.logits(memory, query, continuation=CONTINUATION)
        got = logits[b, -expected.shape[0]:]
        assert (got - expected).abs().max() <= 1e-4


def test_full_memory_through_the_cache_gives_the_models_own_logits():
    comp, memory = compressed("qwen2", method="full")
    full = comp.full_inputs(DEMOS, QUERIES[1], system="Classify.")
    with torch.no_grad():
        own = comp.model(**full).logits[0].float()
    inputs = comp.query_inputs(memory, QUERIES[1])
    with emloc.routed(comp.model), torch.no_grad():
        through_cache = comp.model(**inputs).logits[0].float()
    assert memory.offset + inputs["input_ids"].shape[1] == full["input_ids"].shape[1]
    assert (through_cache - own[memory.offset:]).abs().max() <= 1e-4


# -- generate -------------------------------------------------------------------------------
def test_greedy_generate_equals_emloc_decoding_token_for_token(family_memory):
    comp, memory = family_memory
    stop = comp._stop_ids()
    expected = emloc_tokens(comp, memory, QUERIES, 12)
    batched = hf_generate(comp, memory, QUERIES, max_new_tokens=12, do_sample=False)
    for b, query in enumerate(QUERIES):
        assert trim(batched[b], stop, comp.pad_id) == expected[b]
        alone = hf_generate(comp, memory, [query], max_new_tokens=12, do_sample=False)
        assert trim(alone[0], stop, comp.pad_id) == expected[b]  # batch with padding == one by one


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eager_and_sdpa_models_both_work(attn):
    comp, memory = compressed("mistral", attn=attn)
    got = hf_generate(comp, memory, QUERIES, max_new_tokens=6, do_sample=False)
    expected = emloc_tokens(comp, memory, QUERIES, 6)
    assert [trim(g, comp._stop_ids(), comp.pad_id) for g in got] == expected
    assert comp.model.config._attn_implementation == attn  # routing is restored


def test_seeded_sampling_is_reproducible_and_beam_search_runs(llama_memory):
    comp, memory = llama_memory
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(hf_generate(comp, memory, QUERIES, max_new_tokens=8, do_sample=True, top_k=50))
    assert torch.equal(draws[0], draws[1])
    beams = hf_generate(comp, memory, QUERIES[:2], max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    greedy = emloc_tokens(comp, memory, QUERIES[:1], 5)[0]
    one_beam = hf_generate(comp, memory, QUERIES[:1], max_new_tokens=5, num_beams=1)
    assert trim(one_beam[0], comp._stop_ids(), comp.pad_id) == greedy


def test_streamer_receives_exactly_the_generated_text(llama_memory):
    comp, memory = llama_memory
    tok = comp.tokenizer
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    new = hf_generate(comp, memory, QUERIES[:1], max_new_tokens=10, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == tok.decode(new[0], skip_special_tokens=True)
    assert streamed  # something was generated


def test_memory_bit_identical_after_20_generate_calls(llama_memory):
    comp, memory = llama_memory
    snap = snapshot(memory)
    for i in range(20):
        hf_generate(comp, memory, QUERIES[: 1 + i % 3], max_new_tokens=3, do_sample=i % 2 == 1)
    assert_bit_identical(memory, snap)


def test_memory_layers_are_shared_not_copied(llama_memory):
    comp, memory = llama_memory
    cache = memory.as_cache(comp.model)
    for layer, kept in zip(cache.layers, memory.layers):
        assert layer.memory_keys.data_ptr() == kept.keys.data_ptr()
        assert layer.memory_values.data_ptr() == kept.values.data_ptr()
    assert cache.get_seq_length() == memory.offset


# -- mistakes -------------------------------------------------------------------------------
def test_unrouted_model_is_refused(llama_memory):
    comp, memory = llama_memory
    inputs = comp.query_inputs(memory, QUERIES[0])
    with pytest.raises(emloc.EMLoCError, match="routed"):
        comp.model(**inputs)


def test_attention_mask_without_the_memory_columns_is_refused(llama_memory):
    comp, memory = llama_memory
    inputs = comp.query_inputs(memory, QUERIES)
    inputs["attention_mask"] = inputs["attention_mask"][:, memory.offset:]
    with emloc.routed(comp.model), pytest.raises(emloc.EMLoCError, match="memory.offset"):
        comp.model(**inputs)


def test_memory_of_another_model_is_refused(llama_memory):
    comp, memory = llama_memory
    with pytest.raises(emloc.EMLoCError, match="another model"):
        memory.as_cache(tiny_model("llama", n_layers=3, std=0.2, seed=8))


# -- EMLoC.generate with transformers' options ---------------------------------------------------
class Forbid:
    """A logits processor that forbids one token."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = float("-inf")
        return scores


class StopAfter:
    """A stopping criterion: stop once `n` tokens were generated after `prompt` ids."""

    def __init__(self, prompt, n):
        self.prompt, self.n = prompt, n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt >= self.n, dtype=torch.bool)


def test_generate_with_transformers_options_matches_emloc_decoding(llama_memory, capsys):
    comp, memory = llama_memory
    tok = comp.tokenizer
    plain = comp.generate(memory, QUERIES, max_new_tokens=10)
    assert comp.generate(memory, QUERIES, generation_config=GenerationConfig(max_new_tokens=10)) == plain
    streamed = comp.generate(memory, QUERIES[0], max_new_tokens=10,
                             streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    assert streamed == plain[0]
    assert capsys.readouterr().out.strip() == plain[0]  # the streamer printed exactly the answer
    first = emloc_tokens(comp, memory, QUERIES[:1], 1)[0][0]
    forbidden = comp.generate(memory, QUERIES[0], max_new_tokens=10, logits_processor=[Forbid(first)])
    assert forbidden != plain[0]
    prompt = comp.query_inputs(memory, QUERIES[0], cache=False)["input_ids"].shape[1]
    short = comp.generate(memory, QUERIES[0], max_new_tokens=10, stopping_criteria=[StopAfter(prompt, 2)])
    assert short == tok.decode(emloc_tokens(comp, memory, QUERIES[:1], 2)[0], skip_special_tokens=True).strip()
    several = comp.generate(memory, QUERIES[:2], max_new_tokens=4, do_sample=True, seed=1, num_return_sequences=3)
    assert len(several) == 2 and all(len(answers) == 3 for answers in several)
    assert several == comp.generate(memory, QUERIES[:2], max_new_tokens=4, do_sample=True, seed=1,
                                    num_return_sequences=3)  # seeded: reproducible


def test_generate_options_mistakes_are_refused(llama_memory):
    comp, memory = llama_memory
    with pytest.raises(emloc.EMLoCError, match="one query at a time"):
        comp.generate(memory, QUERIES, streamer=TextStreamer(comp.tokenizer))
    with pytest.raises(emloc.EMLoCError, match="GenerationConfig"):
        comp.generate(memory, QUERIES[0], generation_config={"max_new_tokens": 3})
    with pytest.raises(emloc.EMLoCError, match="num_return_sequences"):
        comp.generate(memory, QUERIES[0], num_return_sequences=0)


# -- the registered pipeline ------------------------------------------------------------------
def test_pipeline_answers_from_a_memory_and_batches_lists(llama_memory, monkeypatch):
    from transformers import pipeline

    comp, memory = llama_memory
    pipe = pipeline("emloc-text-generation", model=comp.model, tokenizer=comp.tokenizer)
    expected = comp.generate(memory, QUERIES, max_new_tokens=6)
    assert pipe(QUERIES[1], memory=memory, max_new_tokens=6) == [{"generated_text": expected[1]}]
    calls = []
    real = pipe.emloc.generate
    monkeypatch.setattr(pipe.emloc, "generate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert pipe(QUERIES, memory=memory, max_new_tokens=6) == [[{"generated_text": e}] for e in expected]
    assert calls == [QUERIES]  # the list went to generate as one batch
    with pytest.raises(emloc.EMLoCError, match="memory="):
        pipe(QUERIES[0])


def test_set_attn_implementation_emloc_routes_for_good():
    comp, memory = compressed("qwen3")
    comp.model.set_attn_implementation("emloc")
    with torch.no_grad():
        logits = comp.model(**comp.query_inputs(memory, QUERIES[2])).logits[0, -1].float()
    assert (logits - comp.logits(memory, QUERIES[2])[0]).abs().max() <= 1e-4


def test_custom_4d_masks_other_than_causal_are_refused(llama_memory):
    comp, memory = llama_memory
    inputs = comp.query_inputs(memory, QUERIES[1])
    T = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, T, T, dtype=torch.bool)  # bidirectional over the query
    with emloc.routed(comp.model), pytest.raises(emloc.EMLoCError, match="causal"):
        comp.model(**inputs)


def test_crop_removes_new_tokens_only(llama_memory):
    comp, memory = llama_memory
    inputs = comp.query_inputs(memory, QUERIES[0])
    cache = next(v for k, v in inputs.items() if k in ("cache", "past_key_values"))
    with emloc.routed(comp.model), torch.no_grad():
        comp.model(**inputs)
    T = inputs["input_ids"].shape[1]
    assert cache.get_seq_length() == memory.offset + T
    cache.crop(-2)
    assert cache.get_seq_length() == memory.offset + T - 2 and cache.layers[1].keys.shape[2] == T - 2
    with pytest.raises(emloc.EMLoCError, match="never cropped"):
        cache.crop(-T)


# -- the bundled SmolLM2 ----------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_smollm2_through_the_cache_equals_emloc():
    pytest.importorskip("gguf", reason="the bundled model is a GGUF file (the compat env has no gguf)")
    from emloc.cli.demo import load_task
    from real_model import smollm2_loading

    model, tokenizer, loading_stderr = smollm2_loading()
    assert "GGUF" not in loading_stderr  # load_model silences the conversion's progress bar
    rows = load_task()
    # pyramid: per-layer lengths that differ (like emloc's) without the search's cost
    comp = emloc.EMLoC(model, tokenizer, method="pyramid", keep_ratio=0.4, demos_per_chunk=3, progress=False)
    memory = comp.compress(rows[:3], system="Answer with the name of the capital city only.")
    assert len(set(memory.layer_lengths)) > 3
    queries = [r["input"] for r in rows[3:5]]
    inputs = comp.query_inputs(memory, queries)
    with emloc.routed(model), torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    for b, query in enumerate(queries):
        assert (logits[b] - comp.logits(memory, query)[0]).abs().max() <= 1e-4
    expected = emloc_tokens(comp, memory, queries, 8)
    got = hf_generate(comp, memory, queries, max_new_tokens=8, do_sample=False)
    assert [trim(g, comp._stop_ids(), comp.pad_id) for g in got] == expected


# -- vision-language ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_language_queries_with_images_through_the_cache(family):
    """Images in the queries; 3-D positions continue from the memory's offset. (The tiny
    processor is built with transformers 5.2x APIs: under 5.17 the test cannot build it.)"""
    vl = pytest.importorskip("tiny_vl_models", reason="the tiny VL processor needs transformers' "
                             "VideoProcessorMixin (absent in this transformers)", exc_type=ImportError)
    tiny_images, tiny_vl_model, tiny_vl_processor = vl.tiny_images, vl.tiny_vl_model, vl.tiny_vl_processor

    images = tiny_images(((56, 56), (84, 56), (56, 84), (112, 56), (56, 56), (84, 84)))
    demos = [{"input": [{"type": "image", "image": image}, {"type": "text", "text": "Which shape?"}],
              "output": shape} for image, shape in zip(images, ["round", "square", "round", "square"])]
    comp = emloc.EMLoC(tiny_vl_model(family), tiny_vl_processor(family), demos_per_chunk=2, progress=False)
    memory = comp.compress(demos, system="Name the shape.")
    assert memory.offset < memory.context_length  # M-RoPE: images take fewer positions than tokens
    queries = [[{"type": "image", "image": images[4]}, {"type": "text", "text": "Which shape?"}],
               [{"type": "text", "text": "And this one, the big one?"}, {"type": "image", "image": images[5]}]]
    inputs = comp.query_inputs(memory, queries)
    assert inputs["position_ids"].shape[0] == 3 and int(inputs["position_ids"][:, :, -1].min()) > memory.offset
    with emloc.routed(comp.model), torch.no_grad():
        logits = comp.model(**inputs).logits[:, -1].float()
    for b, query in enumerate(queries):
        assert (logits[b] - comp.logits(memory, query)[0]).abs().max() <= 1e-4
    expected = emloc_tokens(comp, memory, queries, 6)
    got = hf_generate(comp, memory, queries, max_new_tokens=6, do_sample=False)
    assert [trim(g, comp._stop_ids(), comp.pad_id) for g in got] == expected
