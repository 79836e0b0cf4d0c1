"""Qwen2-VL / Qwen2.5-VL: images and videos in demos and queries, end to end on tiny random models.

The references are the model itself and its processor, never emloc's own code:
- the uncompressed sequence is rendered by the processor's chat template and processed by the
  processor (`processor_inputs`), and `model(**inputs)` gives the logits a full memory must equal;
- positions come from `model.model.get_rope_index` over sequences built here from token ids and
  grids (`rope_index`, `inputs_from`), compared with what emloc feeds the rotary embedding;
- greedy decoding is recomputed by plain no-cache forwards of the model over the whole sequence.
"""
import copy
import functools
import importlib

import pytest
import torch

import emloc
from tiny_models import chat_tokenizer, tiny_model
from tiny_vl_models import FAMILIES, tiny_images, tiny_video, tiny_vl_model, tiny_vl_processor

# (width, height) -> 4, 6, 12, 6, 16, 9, 12 image tokens (t*h*w / 4 patches of 14 px)
IMAGES = tiny_images(((56, 56), (84, 56), (112, 84), (56, 84), (112, 112), (84, 84), (84, 112)), seed=1)
VIDEO = tiny_video(8, seed=3)  # 8 frames of 56x56: grid [4, 4, 4], 16 tokens, 4 temporal steps > 2 spatial


def text(t):
    return {"type": "text", "text": t}


def image(i):
    return {"type": "image", "image": IMAGES[i]}


DEMOS = [  # 1-3 images of different sizes per demo, a text-only demo among them, a video demo last
    {"input": [image(0), text("what is it?")], "output": "a cat"},
    {"input": [text("compare"), image(1), image(2)], "output": "same"},
    {"input": "plain text demo", "output": "ok"},
    {"input": [image(3), text("count"), image(4), image(5)], "output": "three"},
    {"input": [{"type": "video", "video": VIDEO}, text("video?")], "output": "moving"},
]
SYSTEM = "Describe."
QUERIES = {"image": [text("and this"), image(6), text(" one?")], "text": "what is shown?"}
CONTINUATION = " a cat"


@functools.lru_cache(maxsize=None)
def vl(family):
    """(model, processor) of a family; std=0.2 gives non-degenerate (far from uniform) logits."""
    return tiny_vl_model(family, n_layers=2, hidden=64, std=0.2, seed=0), tiny_vl_processor(family)


@functools.lru_cache(maxsize=None)
def full_memory(family, demos_per_chunk):
    model, processor = vl(family)
    comp = emloc.EMLoC(model, processor, method="full", demos_per_chunk=demos_per_chunk, progress=False)
    return comp, comp.compress(DEMOS, system=SYSTEM)


# -- independent references -------------------------------------------------------------------
def processor_inputs(processor, demos, query, system):
    """The whole conversation (system, demos, query + generation prompt) rendered by the
    processor's chat template in one piece and processed by the processor."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    for demo in demos:
        messages += [{"role": "user", "content": demo["input"]}, {"role": "assistant", "content": demo["output"]}]
    messages.append({"role": "user", "content": query})
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
    images = [p["image"] for p in parts if p["type"] == "image"]
    videos = [p["video"] for p in parts if p["type"] == "video"]
    return dict(processor(text=[chat], images=images or None, videos=videos or None, return_tensors="pt"))


def with_continuation(inputs, ids):
    """Inputs with text token ids appended (mm_token_type_ids 0 for them)."""
    extra = torch.tensor([ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out


def model_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0].float()


def inputs_from(model, ids, media):
    """Model inputs of one sequence from its token ids and its media (in order of appearance)."""
    ids_t = torch.tensor([ids])
    types = torch.zeros_like(ids_t)
    types[ids_t == model.config.image_token_id] = 1
    types[ids_t == model.config.video_token_id] = 2
    inputs = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "mm_token_type_ids": types}
    images = [m.grid_thw for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    if images:
        inputs["image_grid_thw"] = torch.stack(images)
    if videos:
        inputs["video_grid_thw"] = torch.stack([m.grid_thw for m in videos])
        if videos[0].second_per_grid is not None:
            inputs["second_per_grid_ts"] = torch.tensor([m.second_per_grid for m in videos])
    return inputs


def rope_index(model, inputs):
    """[3, T] M-RoPE positions the model computes for the (one-row) inputs."""
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              attention_mask=inputs["attention_mask"], **extra)
    return positions[:, 0]


class RotaryRecorder:
    """Records the positions fed to the model's rotary embedding while `on`."""

    def __init__(self, model, monkeypatch):
        rotary = model.get_decoder().rotary_emb
        original = rotary.forward
        self.calls, self.on = [], False

        def forward(x, position_ids):
            if self.on:
                self.calls.append(position_ids.detach().cpu().clone())
            return original(x, position_ids)

        monkeypatch.setattr(rotary, "forward", forward)


def decisions(memory):
    return [[(d["ratio"], d["kept"]) for d in chunk["layers"]] for chunk in memory.stats]


# -- 1. method="full" equals the model on the full sequence ----------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("query", ["image", "text"])
def test_full_inputs_are_what_the_processor_gives(family, query):
    """The chunked rendering, concatenated, is the processor's rendering of the whole chat."""
    model, processor = vl(family)
    comp, _ = full_memory(family, 2)
    ours = comp.full_inputs(DEMOS, QUERIES[query], system=SYSTEM)
    theirs = processor_inputs(processor, DEMOS, QUERIES[query], SYSTEM)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert (theirs["mm_token_type_ids"] == 1).sum() == 4 + 6 + 12 + 6 + 16 + 9 + (12 if query == "image" else 0)
    assert (theirs["mm_token_type_ids"] == 2).sum() == 16


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("demos_per_chunk", [1, 2, 3])
@pytest.mark.parametrize("query", ["image", "text"])
def test_full_memory_logits_equal_model_on_full_sequence(family, demos_per_chunk, query):
    model, processor = vl(family)
    comp, memory = full_memory(family, demos_per_chunk)
    ours = comp.logits(memory, QUERIES[query])
    assert ours.dtype == torch.float32 and ours.shape == (1, model.config.text_config.vocab_size)
    reference = model_logits(model, comp.full_inputs(DEMOS, QUERIES[query], system=SYSTEM))[-1]
    assert (ours[0] - reference).abs().max().item() <= 1e-4
    # the processor's own inputs give the same logits (rendering is independent of emloc)
    reference = model_logits(model, processor_inputs(processor, DEMOS, QUERIES[query], SYSTEM))[-1]
    assert (ours[0] - reference).abs().max().item() <= 1e-4
    assert reference.std() > 0.5  # random but far from uniform: a wrong position or feature shows
    n_chunks = -(-len(DEMOS) // demos_per_chunk)
    assert len(memory.stats) == n_chunks
    assert memory.layer_lengths == [memory.context_length] * model.config.text_config.num_hidden_layers
    # M-RoPE compresses image positions: the offset is below the token count
    assert memory.offset < memory.context_length


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("query", ["image", "text"])
def test_full_memory_continuation_rows_equal_model(family, query):
    model, processor = vl(family)
    comp, memory = full_memory(family, 2)
    ours = comp.logits(memory, QUERIES[query], continuation=CONTINUATION)
    cont = processor.tokenizer(CONTINUATION, add_special_tokens=False)["input_ids"]
    assert len(cont) >= 2
    inputs = with_continuation(processor_inputs(processor, DEMOS, QUERIES[query], SYSTEM), cont)
    reference = model_logits(model, inputs)[-(len(cont) + 1):]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4


def test_without_video_full_memory_equals_model():
    """Images only (no video), default system prompt, one chunk per demo and one for all."""
    model, processor = vl("qwen2_5_vl")
    demos = DEMOS[:4]
    for dpc in (1, 4):
        comp = emloc.EMLoC(model, processor, method="full", demos_per_chunk=dpc, progress=False)
        memory = comp.compress(demos)
        ours = comp.logits(memory, QUERIES["image"])[0]
        reference = model_logits(model, processor_inputs(processor, demos, QUERIES["image"], None))[-1]
        assert (ours - reference).abs().max().item() <= 1e-4


# -- 2. positions fed to the rotary embedding --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("demos_per_chunk", [2, 3])
def test_positions_of_chunks_probe_rows_and_query_equal_the_full_sequence(family, demos_per_chunk, monkeypatch):
    model, processor = vl(family)
    comp = emloc.EMLoC(model, processor, demos_per_chunk=demos_per_chunk, tolerance=0.02, backend="torch",
                       batch_candidates=False, progress=False)
    recorder = RotaryRecorder(model, monkeypatch)
    recorder.on = True
    memory = comp.compress(DEMOS, system=SYSTEM)
    comp.logits(memory, QUERIES["image"])
    recorder.on = False
    calls = recorder.calls

    chunks, probes = comp._chunks(DEMOS, SYSTEM)
    query = comp.renderer.query(QUERIES["image"])
    n_chunks = len(chunks)
    assert n_chunks == len(memory.stats) >= 2
    assert len(calls) == 2 * n_chunks + 1  # per chunk: prefill, probe (tests reuse the probe's); query
    full = processor_inputs(processor, DEMOS, QUERIES["image"], SYSTEM)
    assert full["input_ids"][0].tolist() == [t for c in chunks for t in c.ids] + query.ids
    full_positions = rope_index(model, full)

    start, media = 0, []
    for c, (chunk, rows) in enumerate(zip(chunks, probes)):
        prefill, probe = calls[2 * c], calls[2 * c + 1]
        length = len(chunk.ids)
        assert prefill.shape == (3, 1, length)
        assert torch.equal(prefill[:, 0], full_positions[:, start:start + length]), f"chunk {c}"
        if any(m.kind == "image" for m in chunk.media):  # image tokens get real 3-D positions
            assert (prefill[1] != prefill[0]).any() and (prefill[2] != prefill[1]).any()
        media += chunk.media
        prefix = [t for k in chunks[:c + 1] for t in k.ids]
        assert probe.shape[:2] == (3, len(rows))
        for b, row in enumerate(rows):  # each demo alone, placed right after chunk c
            expected = rope_index(model, inputs_from(model, prefix + row.ids, media + row.media))
            assert torch.equal(probe[:, b, :len(row.ids)], expected[:, len(prefix):]), f"chunk {c} row {b}"
        start += length
    query_positions = calls[-1]
    assert query_positions.shape == (3, 1, len(query.ids))
    assert torch.equal(query_positions[:, 0], full_positions[:, start:])
    assert (query_positions[1] != query_positions[0]).any()
    assert (full_positions[:, start] == memory.offset).all()  # the query starts at the memory's offset


# -- 3. the fast path makes the same decisions as the PyTorch reference path -----------------------
TRITON_LAUNCHERS = [("prefix_attention", "prefix_attention_triton"), ("probe_scores", "_probe_scores_triton"),
                    ("ranking", "rank_tokens_triton"), ("compaction", "gather_append_triton"),
                    ("lm_head_js", "lm_head_js_triton")]


@pytest.fixture(scope="module")
def backends():
    """One family only: the kernels never see images or positions, and the interpreter is slow
    (about 18 s per compression of the three chunks)."""
    model, processor = vl("qwen2_5_vl")
    memories, launches = {}, {}
    for backend in ("torch", "triton"):
        comp = emloc.EMLoC(model, processor, demos_per_chunk=2, tolerance=0.02, backend=backend,
                           progress=False)
        calls = launches[backend] = {name: 0 for _, name in TRITON_LAUNCHERS}
        with pytest.MonkeyPatch.context() as mp:  # count the Triton launches (no silent fallback)
            for module_name, name in TRITON_LAUNCHERS:
                module = importlib.import_module(f"emloc_kernels.{module_name}")

                def spy(*args, _name=name, _original=getattr(module, name), **kwargs):
                    calls[_name] += 1
                    return _original(*args, **kwargs)

                mp.setattr(module, name, spy)
            memories[backend] = comp.compress(DEMOS, system=SYSTEM)
    return memories, launches


def test_triton_and_torch_make_the_same_decisions_with_images(backends):
    memories, launches = backends
    assert all(n == 0 for n in launches["torch"].values()), launches["torch"]
    assert all(n > 0 for n in launches["triton"].values()), launches["triton"]
    ours, theirs = memories["triton"], memories["torch"]
    outcomes = [(d["kept"] < chunk["tokens"]) for chunk in theirs.stats for d in chunk["layers"]]
    assert any(outcomes) and not all(outcomes)  # some layer prunes, some keeps the whole chunk
    assert any(d["kept_image"] < chunk["image_tokens"] for chunk in theirs.stats for d in chunk["layers"])
    assert decisions(ours) == decisions(theirs)
    for chunk_ours, chunk_theirs in zip(ours.stats, theirs.stats):
        assert chunk_ours["image_tokens"] == chunk_theirs["image_tokens"]
        for a, b in zip(chunk_ours["layers"], chunk_theirs["layers"]):
            assert a["tests"] == b["tests"]
            assert (a["js"] is None) == (b["js"] is None)
            if a["js"] is not None:
                assert abs(a["js"] - b["js"]) <= 1e-5
            assert a["kept_image"] == b["kept_image"] and a["kept_video"] == b["kept_video"]
    assert ours.layer_lengths == theirs.layer_lengths and ours.offset == theirs.offset
    for a, b in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_candidates_decide_as_in_order_with_images(family):
    """The GPU default (all candidates of a layer in one forward, positions repeated per
    replica) against the one-by-one search, on the PyTorch path."""
    model, processor = vl(family)
    memories = [emloc.EMLoC(model, processor, demos_per_chunk=2, tolerance=0.02, backend="torch",
                            batch_candidates=batch, progress=False).compress(DEMOS, system=SYSTEM)
                for batch in (False, True)]
    assert decisions(memories[0]) == decisions(memories[1])
    assert len({ratio for chunk in decisions(memories[0]) for ratio, _ in chunk}) >= 3
    for chunk_a, chunk_b in zip(memories[0].stats, memories[1].stats):
        for a, b in zip(chunk_a["layers"], chunk_b["layers"]):
            if a["js"] is not None and a["ratio"] < 1.0:  # the accepted candidate's JS
                assert abs(a["js"] - b["js"]) <= 1e-5 + 1e-4 * a["js"]
    for a, b in zip(*(m.layers for m in memories)):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)


# -- 4. greedy decoding equals no-cache forwards of the model ----------------------------------------
def greedy_reference(model, inputs, max_new_tokens, stop):
    """Greedy ids by recomputing the model over the whole sequence at every step."""
    ids = []
    for _ in range(max_new_tokens):
        token = int(model_logits(model, with_continuation(inputs, ids))[-1].argmax())
        ids.append(token)
        if token in stop:
            break
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_model_recomputed_over_full_sequence(family, monkeypatch):
    model, processor = vl(family)
    comp, memory = full_memory(family, 2)
    tok = processor.tokenizer
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    recorder = RotaryRecorder(model, monkeypatch)
    names = ["image", "text"]
    expected_texts, expected_positions = [], []
    for name in names:
        inputs = comp.full_inputs(DEMOS, QUERIES[name], system=SYSTEM)
        ids = greedy_reference(model, inputs, 4, stop)
        assert ids[0] not in stop  # something is generated
        expected_texts.append(tok.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip())
        # the query, then each generated token fed back, where the full sequence puts them
        n_query = len(comp.renderer.query(QUERIES[name]).ids)
        n = inputs["input_ids"].shape[1]
        reference = rope_index(model, with_continuation(inputs, ids))
        expected_positions.append((reference[:, n - n_query:n], reference[:, n:n + len(ids) - 1]))
        if name == "image":  # the image makes positions differ from token counts
            assert int(reference[0, n]) < n

        recorder.calls, recorder.on = [], True
        assert comp.generate(memory, QUERIES[name], max_new_tokens=4) == expected_texts[-1]
        recorder.on = False
        prefill, steps = recorder.calls[0], recorder.calls[1:]
        assert torch.equal(prefill[:, 0], expected_positions[-1][0])
        assert len(steps) == len(ids) - 1
        for i, step in enumerate(steps):
            assert torch.equal(step[:, 0, 0], expected_positions[-1][1][:, i])

    # one left-padded batch of both queries: same texts, same positions per row
    recorder.calls, recorder.on = [], True
    assert comp.generate(memory, [QUERIES[name] for name in names], max_new_tokens=4) == expected_texts
    recorder.on = False
    prefill, steps = recorder.calls[0], recorder.calls[1:]
    for b, (query_positions, step_positions) in enumerate(expected_positions):
        assert torch.equal(prefill[:, b, prefill.shape[2] - query_positions.shape[1]:], query_positions)
        for i in range(step_positions.shape[1]):  # rows that stopped early decode on, unchecked
            assert torch.equal(steps[i][:, b, 0], step_positions[:, i])


# -- 5. save / load, and answering leaves the memory unchanged ---------------------------------------
@pytest.fixture(scope="module")
def pruned():
    model, processor = vl("qwen2_vl")
    comp = emloc.EMLoC(model, processor, demos_per_chunk=2, tolerance=0.005, backend="torch", progress=False)
    return comp, comp.compress(DEMOS, system=SYSTEM)


def test_saved_and_loaded_memory_answers_bit_identically(pruned, tmp_path):
    comp, memory = pruned
    assert memory.compression_ratio > 1.2
    path = tmp_path / "vl.emloc"
    memory.save(path)
    loaded = emloc.TaskMemory.load(path, comp.model)
    assert loaded.offset == memory.offset and loaded.layer_lengths == memory.layer_lengths
    assert loaded.stats == memory.stats
    assert all("kept_image" in d and "kept_video" in d for chunk in loaded.stats for d in chunk["layers"])
    assert [c["image_tokens"] for c in loaded.stats] == [c["image_tokens"] for c in memory.stats]
    fresh = emloc.EMLoC(comp.model, tiny_vl_processor("qwen2_vl"), progress=False)  # a new processor
    for query in QUERIES.values():
        assert torch.equal(fresh.logits(loaded, query, continuation=CONTINUATION),
                           comp.logits(memory, query, continuation=CONTINUATION))
    assert fresh.generate(loaded, list(QUERIES.values()), max_new_tokens=3) == \
        comp.generate(memory, list(QUERIES.values()), max_new_tokens=3)


def test_answering_leaves_the_memory_bit_identical(pruned):
    comp, memory = pruned
    before = [(l.keys.clone(), l.values.clone(), l._k.data_ptr()) for l in memory.layers]
    offset, stats = memory.offset, copy.deepcopy(memory.stats)
    first = comp.logits(memory, QUERIES["image"])
    comp.generate(memory, [QUERIES["image"], QUERIES["text"], [image(2), text("and?")]], max_new_tokens=3)
    comp.generate(memory, QUERIES["image"], max_new_tokens=2, do_sample=True, seed=3)
    comp.logits(memory, QUERIES["text"], continuation=CONTINUATION)
    assert torch.equal(comp.logits(memory, QUERIES["image"]), first)
    assert memory.offset == offset and memory.stats == stats
    for layer, (k, v, pointer) in zip(memory.layers, before):
        assert layer._k.data_ptr() == pointer
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


# -- 6. bad input -----------------------------------------------------------------------------------
def bad(content):
    """Demos whose demo 3 (in the second chunk of two demos) has `content` as input."""
    return DEMOS[:3] + [{"input": content, "output": "x"}]


@pytest.mark.parametrize("content,message", [
    ([{"type": "image", "image": 3}, text("x")], "demo 3 input: the processor cannot take this image"),
    ([{"type": "image", "image": "/nonexistent/cat.png"}], "demo 3 input: no image file at /nonexistent/cat.png"),
    ([{"type": "image"}, text("x")], "demo 3 input: a part of type 'image' has no 'image' entry"),
    ([{"type": "image", "image": None}], "demo 3 input: a part of type 'image' has no 'image' entry"),
    ([image(0), text("a <|image_pad|> b")], "demo 3 input: the text contains the image placeholder token"),
    ([text("a <|image_pad|> b")], "demo 3 input: the text contains the image placeholder token"),
    ("a <|video_pad|> b", "demo 3 input: the text contains the video placeholder token"),
    ([{"type": "video", "video": IMAGES[0]}], "demo 3 input: a video must be a non-empty list of frames"),
    ([{"type": "video", "video": []}], "demo 3 input: a video must be a non-empty list of frames"),
    ([{"type": "audio", "audio": b"x"}], "demo 3 input: unknown content part type 'audio'"),
    ([text("x"), "not a part"], "demo 3 input: content parts must be dicts"),
])
def test_bad_media_input(content, message):
    model, processor = vl("qwen2_vl")
    comp = emloc.EMLoC(model, processor, demos_per_chunk=2, method="full", progress=False)
    with pytest.raises(emloc.EMLoCError, match=message):
        comp.compress(bad(content))


def test_cheap_checks_fail_before_any_chunk_is_compressed(monkeypatch):
    """A missing file or entry in the last demo is reported before chunk 0 is compressed."""
    from emloc.compression.chunk_loop import ChunkCompressor

    model, processor = vl("qwen2_vl")
    comp = emloc.EMLoC(model, processor, demos_per_chunk=2, method="full", progress=False)
    calls = []
    monkeypatch.setattr(ChunkCompressor, "compress", lambda *a, **k: calls.append(1))
    for content in ([{"type": "image", "image": "/nonexistent/cat.png"}], [{"type": "image"}]):
        with pytest.raises(emloc.EMLoCError, match="demo 3 input"):
            comp.compress(bad(content))
    assert calls == []


def test_demos_past_the_model_positions_are_refused():
    """The chunk's own positions and its probe rows' are checked against max_position_embeddings."""
    processor = vl("qwen2_vl")[1]
    demos = DEMOS[:2]
    big = tiny_vl_model("qwen2_vl", std=0.2, seed=0)
    chunk_end = emloc.EMLoC(big, processor, method="full", progress=False).compress(demos).offset
    for max_positions, method, message in ((chunk_end - 1, "full", "the chunk would reach"),
                                           (chunk_end, "emloc", "the chunk's probe rows would reach")):
        model = tiny_vl_model("qwen2_vl", std=0.2, seed=0, max_positions=max_positions)
        with pytest.raises(emloc.EMLoCError, match=f"{message}.*past the model's {max_positions} positions"):
            emloc.EMLoC(model, processor, method=method, progress=False).compress(demos)
    model = tiny_vl_model("qwen2_vl", std=0.2, seed=0, max_positions=chunk_end)
    assert emloc.EMLoC(model, processor, method="full", progress=False).compress(demos).offset == chunk_end


def test_placeholder_in_an_answer_is_refused():
    model, processor = vl("qwen2_vl")
    comp = emloc.EMLoC(model, processor, method="full", progress=False)
    with pytest.raises(emloc.EMLoCError, match="demo 0 output.*'<\\|image_pad\\|>', a control token"):
        comp.compress([{"input": [image(0), text("?")], "output": "a <|image_pad|>"}])


def test_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    model, processor = vl("qwen2_vl")
    with pytest.raises(emloc.EMLoCError, match="is not an image PIL can read"):
        emloc.EMLoC(model, processor, progress=False).compress(bad([{"type": "image", "image": str(path)}]))


def test_bad_media_in_a_query():
    comp, memory = full_memory("qwen2_vl", 2)
    with pytest.raises(emloc.EMLoCError, match="query: no image file at"):
        comp.generate(memory, [{"type": "image", "image": "/nonexistent/q.png"}, text("?")])
    with pytest.raises(emloc.EMLoCError, match="query: the text contains the image placeholder token"):
        comp.logits(memory, [image(0), text("<|image_pad|>")])


def test_video_with_a_processor_without_video_processor():
    model, processor = vl("qwen2_vl")
    no_video = copy.copy(processor)
    no_video.video_processor = None
    comp = emloc.EMLoC(model, no_video, progress=False)
    with pytest.raises(emloc.EMLoCError, match="no video processor"):
        comp.compress(DEMOS)  # the video demo is last: images before it are fine
    memory = emloc.EMLoC(model, no_video, method="full", progress=False).compress(DEMOS[:4])
    assert memory.context_length > 0


def test_image_part_for_a_text_only_model():
    comp = emloc.EMLoC(tiny_model("llama", n_layers=2), chat_tokenizer(), demos_per_chunk=2, progress=False)
    demos = [{"input": f"text demo {i}", "output": "x"} for i in range(3)]
    with pytest.raises(emloc.EMLoCError, match="demo 3 input: a part of type 'image' needs a vision-language"):
        comp.compress(demos + [{"input": [image(0), text("what?")], "output": "x"}])
    memory = comp.compress(demos)
    with pytest.raises(emloc.EMLoCError, match="query: a part of type 'image' needs a vision-language"):
        comp.generate(memory, [image(0), text("what?")])


def test_vision_language_model_with_a_bare_tokenizer():
    model, processor = vl("qwen2_vl")
    comp = emloc.EMLoC(model, processor.tokenizer, progress=False)
    with pytest.raises(emloc.EMLoCError, match="processor.*not .*tokenizer"):
        comp.compress(DEMOS[:2])
    memory = emloc.EMLoC(model, processor.tokenizer, method="full", progress=False).compress(DEMOS[2:3])
    assert comp.logits(memory, "text only works").shape[0] == 1


# -- 7. kept tokens by modality -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_full_memory_keeps_every_image_and_video_token(family):
    model, processor = vl(family)
    comp, memory = full_memory(family, 2)
    full = processor_inputs(processor, DEMOS, QUERIES["text"], SYSTEM)
    types, start = full["mm_token_type_ids"][0], 0
    for chunk in memory.stats:
        own = types[start:start + chunk["tokens"]]
        assert chunk["image_tokens"] == int((own == 1).sum()) and chunk["video_tokens"] == int((own == 2).sum())
        for d in chunk["layers"]:
            assert d["kept"] == chunk["tokens"]
            assert d["kept_image"] == chunk["image_tokens"] and d["kept_video"] == chunk["video_tokens"]
        start += chunk["tokens"]
    assert sum(c["image_tokens"] for c in memory.stats) == int((types == 1).sum()) > 0
    assert sum(c["video_tokens"] for c in memory.stats) == 16


def test_pruned_memory_kept_image_counts_match_the_kept_rows(pruned):
    """Chunk 0's kept rows, matched to the rows of the uncompressed chunk 0 (same prefill over an
    empty memory), are image tokens exactly kept_image times (mean over KV heads)."""
    comp, memory = pruned
    _, full = full_memory("qwen2_vl", 2)
    chunk0 = memory.stats[0]
    length = chunk0["tokens"]
    assert full.stats[0]["tokens"] == length
    ids = comp.full_inputs(DEMOS, "q", system=SYSTEM)["input_ids"][0, :length]
    is_image = ids == comp.model.config.image_token_id
    assert chunk0["image_tokens"] == int(is_image.sum()) > 0
    partial = 0
    for l, d in enumerate(chunk0["layers"]):
        kept = memory.layers[l].keys[:, :d["kept"]]
        reference = full.layers[l].keys[:, :length]
        counts = []
        for h in range(kept.shape[0]):
            distance = torch.cdist(kept[h].double(), reference[h].double())
            index = distance.argmin(dim=1)
            assert distance.min(dim=1).values.max() <= 1e-5
            assert (index[1:] > index[:-1]).all()  # distinct, in position order
            counts.append(int(is_image[index].sum()))
        assert d["kept_image"] == sum(counts) / len(counts)
        assert 0 <= d["kept_image"] <= chunk0["image_tokens"]
        partial += 0 < d["kept"] < length
    assert partial  # some layer of chunk 0 prunes
    for chunk in memory.stats:
        for d in chunk["layers"]:
            assert 0 <= d["kept_image"] <= chunk["image_tokens"] and 0 <= d["kept_video"] <= chunk["video_tokens"]
            assert d["kept_image"] + d["kept_video"] <= d["kept"]
