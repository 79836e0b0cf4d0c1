"""The faithful search against an independent, deliberately simple implementation.

The simple version keeps, per layer, the K/V of *every* context token plus a keep mask per KV
head, computes dense float64 attention probabilities, ranks with plain Python, and tests each
candidate one at a time by rerunning the whole probe from layer 0. Its memory must equal
emloc's, layer by layer and head by head, and its decisions emloc's statistics.
"""
import pytest
import torch
from transformers import AttentionInterface

import emloc
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [
    {"input": "the movie was great and wonderful", "output": "positive"},
    {"input": "terrible plot, boring scenes", "output": "negative"},
    {"input": "what is the capital of france", "output": "paris"},
    {"input": "translate to french: cat", "output": "chat"},
    {"input": "2 plus 3 equals", "output": "5"},
    {"input": "the actors were wonderful", "output": "positive"},
    {"input": "I left early", "output": "negative"},
]


def dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, test_ctx=None, **kw):
    """Dense float64 attention over [context (kept) | chunk segment (kept) | own (causal, valid)]."""
    return test_ctx.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register("emloc_test_dense", dense_attention)


class DenseContext:
    def __init__(self, ctx_kv, ctx_keep, chunk_kv=None, chunk_keep=None, valid=None, observer=None):
        self.ctx_kv, self.ctx_keep = ctx_kv, ctx_keep
        self.chunk_kv, self.chunk_keep = chunk_kv, chunk_keep
        self.valid, self.observer = valid, observer
        self.record, self.scores = {}, {}

    def attend(self, l, q, k, v, scale):
        B, Hq, L, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        self.record[l] = (k[0].clone(), v[0].clone())
        keys, values, allowed = [], [], []
        ck, cv = self.ctx_kv[l]
        keys.append(ck[None].expand(B, -1, -1, -1))
        values.append(cv[None].expand(B, -1, -1, -1))
        allowed.append(self.ctx_keep[l][None, :, None, :].expand(B, Hkv, L, -1))
        n_ctx = ck.shape[1]
        if self.chunk_kv is not None:
            chk, chv = self.chunk_kv[l]
            keys.append(chk[None].expand(B, -1, -1, -1))
            values.append(chv[None].expand(B, -1, -1, -1))
            allowed.append(self.chunk_keep[l][None, :, None, :].expand(B, Hkv, L, -1))
        keys.append(k)
        values.append(v)
        own = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, Hkv, L, L)
        if self.valid is not None:
            own = own & self.valid[:, None, None, :]
        allowed.append(own)
        K = torch.cat(keys, 2).double().repeat_interleave(G, 1)
        V = torch.cat(values, 2).double().repeat_interleave(G, 1)
        A = torch.cat(allowed, 3).repeat_interleave(G, 1)
        logits = (q.double() @ K.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~A, float("-inf"))
        out = torch.softmax(logits, -1) @ V
        if self.observer is not None:
            Lc = self.chunk_kv[l][0].shape[1]
            p = torch.softmax(logits[..., n_ctx:], -1)[..., :Lc]  # context excluded from the normaliser
            p = p * self.observer[:, None, :, None]
            self.scores[l] = p.sum(dim=(0, 2)).reshape(Hkv, G, Lc).sum(1)
        return out.to(q.dtype).transpose(1, 2)


def simple_rank(scores_h, protected, k):
    Lc = len(scores_h)
    padded = [0.0, 0.0] + [float(x) for x in scores_h] + [0.0, 0.0]
    smooth = [sum(padded[t:t + 5]) / 5 + (100.0 if protected[t] else 0.0) for t in range(Lc)]
    order = sorted(range(Lc), key=lambda t: (-smooth[t], t))
    return sorted(order[:k])


def simple_emloc(model, comp, demos, tolerance, ratios, layer_group=1):
    """Returns (per chunk, per layer (ratio, kept)) and per layer the kept keys [Hkv, M, D].

    Layers are decided top-down in groups of `layer_group` that share one ratio.
    """
    dec = model.model
    L = model.config.num_hidden_layers
    Hkv, D = model.config.num_key_value_heads, model.config.head_dim
    chunks, probes = comp._chunks(demos, None)
    ctx_kv = [(torch.zeros(Hkv, 0, D), torch.zeros(Hkv, 0, D)) for _ in range(L)]
    ctx_keep = [torch.zeros(Hkv, 0, dtype=torch.bool) for _ in range(L)]
    offset, decisions = 0, []
    model.config._attn_implementation = "emloc_test_dense"

    def forward(ids, positions, ctx):
        h = dec.embed_tokens(ids)
        pe = dec.rotary_emb(h, positions)
        for layer in dec.layers:
            h = layer(h, position_embeddings=pe, position_ids=positions, test_ctx=ctx)
        return model.lm_head(dec.norm(h)).double().log_softmax(-1)

    with torch.no_grad():
        for chunk, rows in zip(chunks, probes):
            Lc = len(chunk.ids)
            pre = DenseContext(ctx_kv, ctx_keep)
            forward(torch.tensor([chunk.ids]), offset + torch.arange(Lc)[None], pre)
            chunk_kv = [pre.record[l] for l in range(L)]
            width = max(len(r.ids) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            valid = torch.zeros(len(rows), width, dtype=torch.bool)
            observer = torch.zeros(len(rows), width, dtype=torch.bool)
            for b, r in enumerate(rows):
                ids[b, :len(r.ids)] = torch.tensor(r.ids)
                valid[b, :len(r.ids)] = True
                observer[b, :len(r.ids)] = torch.tensor(r.answer_mask)
            pos = (offset + Lc + torch.arange(width))[None].expand(len(rows), -1)
            full_keep = [torch.ones(Hkv, Lc, dtype=torch.bool) for _ in range(L)]
            probe = DenseContext(ctx_kv, ctx_keep, chunk_kv, full_keep, valid, observer)
            teacher = forward(ids, pos, probe)[observer]
            protected = chunk.answer_mask
            n_prot = sum(protected)
            keep = list(full_keep)
            chunk_decisions = [None] * L
            for top in range(L - 1, -1, -layer_group):
                group = list(range(max(0, top - layer_group + 1), top + 1))
                for l in group:
                    chunk_decisions[l] = (1.0, Lc)
                for r in ratios:
                    k = min(Lc, max(int(r * Lc), n_prot, 1))
                    if k >= Lc:
                        break
                    trial = list(keep)
                    for l in group:
                        trial[l] = torch.zeros(Hkv, Lc, dtype=torch.bool)
                        for h in range(Hkv):
                            trial[l][h, simple_rank(probe.scores[l][h].tolist(), protected, k)] = True
                    student = forward(ids, pos, DenseContext(ctx_kv, ctx_keep, chunk_kv, trial, valid))[observer]
                    m = torch.logaddexp(teacher, student) - torch.log(torch.tensor(2.0, dtype=torch.float64))
                    js = (0.5 * (teacher.exp() * (teacher - m)).sum(-1) + 0.5 * (student.exp() * (student - m)).sum(-1)).mean()
                    if max(0.0, js.item()) <= tolerance:
                        for l in group:
                            keep[l] = trial[l]
                            chunk_decisions[l] = (r, k)
                        break
            decisions.append(chunk_decisions)
            for l in range(L):
                ctx_kv[l] = (torch.cat([ctx_kv[l][0], chunk_kv[l][0]], 1), torch.cat([ctx_kv[l][1], chunk_kv[l][1]], 1))
                ctx_keep[l] = torch.cat([ctx_keep[l], keep[l]], 1)
            offset += Lc
    model.config._attn_implementation = "sdpa"
    kept_keys = [torch.stack([ctx_kv[l][0][h][ctx_keep[l][h]] for h in range(Hkv)]) for l in range(L)]
    return decisions, kept_keys


# (family, query heads, KV heads, hidden, demos per chunk, init std, seed): GQA groups 2, 4, 1;
# chunks of 3+3+1, 4+3 and 2+2+2+1 demos; each case alone makes all four outcomes occur.
CASES = [("llama", 4, 2, 64, 3, 0.2, 1), ("qwen2", 4, 1, 64, 4, 0.15, 1), ("llama", 3, 3, 48, 2, 0.2, 1)]
OUTCOMES = set()


@pytest.mark.parametrize("family,n_heads,n_kv,hidden,dpc,std,seed", CASES)
def test_decisions_and_memory_equal_simple_implementation(family, n_heads, n_kv, hidden, dpc, std, seed):
    model = tiny_model(family, n_heads=n_heads, n_kv_heads=n_kv, hidden=hidden, n_layers=4, std=std, seed=seed)
    comp = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=dpc, progress=False, backend="torch")
    memory = comp.compress(DEMOS)
    decisions, kept_keys = simple_emloc(model, comp, DEMOS, 0.005, (0.1, 0.2, 0.5))
    ours = [[(d["ratio"], d["kept"]) for d in chunk["layers"]] for chunk in memory.stats]
    assert ours == decisions
    for l, keys in enumerate(kept_keys):
        assert memory.layers[l].keys.shape == keys.shape
        torch.testing.assert_close(memory.layers[l].keys, keys, rtol=1e-4, atol=1e-4)
    OUTCOMES.update(r for chunk in decisions for r, _ in chunk)


@pytest.mark.parametrize("layer_group,batch", [(1, True), (2, False), (3, True)])
def test_grouped_and_batched_search_equal_simple_implementation(layer_group, batch):
    family, n_heads, n_kv, hidden, dpc, std, seed = CASES[0]
    model = tiny_model(family, n_heads=n_heads, n_kv_heads=n_kv, hidden=hidden, n_layers=4, std=std, seed=seed)
    comp = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=dpc, progress=False, backend="torch",
                       layer_group=layer_group, batch_candidates=batch)
    memory = comp.compress(DEMOS)
    decisions, kept_keys = simple_emloc(model, comp, DEMOS, 0.005, (0.1, 0.2, 0.5), layer_group)
    assert [[(d["ratio"], d["kept"]) for d in chunk["layers"]] for chunk in memory.stats] == decisions
    for l, keys in enumerate(kept_keys):
        torch.testing.assert_close(memory.layers[l].keys, keys, rtol=1e-4, atol=1e-4)
    tests = sum(d["tests"] for chunk in memory.stats for d in chunk["layers"])
    groups_per_chunk = -(-4 // layer_group)
    assert tests >= groups_per_chunk * len(memory.stats) or not batch
    if layer_group > 1:  # layers of a group share their ratio
        for chunk in memory.stats:
            ratios = [d["ratio"] for d in chunk["layers"]]
            assert len(set(ratios[4 - layer_group:])) == 1


def test_all_four_outcomes_occurred_in_the_cases_above():
    """Non-degenerate models: every candidate and keep-all were chosen somewhere."""
    if not OUTCOMES:
        for case in CASES:
            test_decisions_and_memory_equal_simple_implementation(*case)
    assert OUTCOMES == {0.1, 0.2, 0.5, 1.0}


def test_huge_tolerance_keeps_first_candidate_everywhere():
    model = tiny_model("llama", n_layers=4, std=0.25, seed=3)
    comp = emloc.EMLoC(model, chat_tokenizer(), tolerance=1e9, demos_per_chunk=3, progress=False)
    memory = comp.compress(DEMOS)
    for chunk in memory.stats:
        for d in chunk["layers"]:
            assert d["tests"] == 1 or d["ratio"] == 1.0
            assert d["ratio"] in (0.1, 1.0)
        assert any(d["ratio"] == 0.1 for d in chunk["layers"]) or chunk["tokens"] < 20
    assert memory.compression_ratio > 1.5


def test_zero_tolerance_prunes_nothing():
    model = tiny_model("qwen2", n_layers=3, std=0.25, seed=4)
    tok = chat_tokenizer()
    zero = emloc.EMLoC(model, tok, tolerance=0.0, demos_per_chunk=3, progress=False).compress(DEMOS)
    full = emloc.EMLoC(model, tok, method="full", demos_per_chunk=3, progress=False).compress(DEMOS)
    assert zero.layer_lengths == full.layer_lengths == [zero.context_length] * 3
    for a, b in zip(zero.layers, full.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
