"""Builders for tiny random models and a small in-code chat tokenizer (no downloads)."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the movie was great and the actors were wonderful",
    "terrible plot, boring scenes, I left early",
    "positive negative neutral sentiment review classify",
    "what is the capital of france paris berlin rome madrid",
    "translate to french: cat chat, dog chien, house maison",
    "0 1 2 3 4 5 6 7 8 9 plus minus equals",
]


@functools.lru_cache(maxsize=1)
def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 384) with ChatML special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(family="llama", n_heads=4, n_kv_heads=2, n_layers=3, hidden=64, head_dim=16, std=0.02,
               seed=0, dtype=torch.float32, max_positions=4096):
    """A random decoder of the given family with the chat tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = len(chat_tokenizer())
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                  head_dim=head_dim, max_position_embeddings=max_positions, initializer_range=std,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model


def tiny_compressed(demos, system="Classify."):
    """(EMLoC, TaskMemory): `demos` compressed in chunks of 4 on a 3-layer tiny Llama (std 0.2,
    seed 7) with the chat tokenizer; the shared fixture of the serving and invariant tests."""
    import emloc

    comp = emloc.EMLoC(tiny_model("llama", n_layers=3, std=0.2, seed=7), chat_tokenizer(),
                       demos_per_chunk=4, progress=False)
    return comp, comp.compress(demos, system=system)
