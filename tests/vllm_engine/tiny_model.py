"""A tiny Llama model directory for vLLM tests: no hub access, built from LlamaConfig.

Deterministic: the weights come from a fixed seed (initializer_range 0.1, so greedy decoding does
not fall into a 2-token cycle), and the word-level tokenizer knows the words w0..w{VOCAB-4}.
2 layers, 2 KV heads of head_dim 32 (the smallest the CPU attention backend takes).
"""
from __future__ import annotations

import json
import os

VOCAB = 512


def build_tiny_llama(path: str, num_layers: int = 2, seed: int = 1234) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return path
