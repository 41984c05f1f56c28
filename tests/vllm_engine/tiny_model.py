"""A tiny Llama model directory (and LoRA adapters for it) for vLLM tests: no hub access, built
from LlamaConfig.

Deterministic: the weights come from a fixed seed (initializer_range 0.1, so greedy decoding does
not fall into a 2-token cycle), and the word-level tokenizer knows the words w0..w{VOCAB-4}.
2 layers, 2 KV heads of head_dim 32 (the smallest the CPU attention backend takes).
"""
from __future__ import annotations

import json
import os

VOCAB = 512


def build_tiny_llama(path: str, num_layers: int = 2, seed: int = 1234, **config_overrides) -> str:
    """`config_overrides` go into LlamaConfig (e.g. layer_types and sliding_window, or larger
    shapes for a benchmark); the weights depend only on the seed and the shapes."""
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
    # A chat prompt is its messages' words one after another (for OpenAI chat requests in tests).
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)

    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                                   initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                   torch_dtype="float32"), **config_overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return path


def build_tiny_lora(path: str, seed: int, rank: int = 8, num_layers: int = 2) -> str:
    """A PEFT LoRA adapter for the tiny Llama, random from `seed`, on k_proj and v_proj: it changes
    the KV itself, so KV computed under another adapter (or none) is wrong for it."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for proj in ("k_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn((rank, 128), generator=gen) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn((64, rank), generator=gen) * 0.1
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
                   "bias": "none", "target_modules": ["k_proj", "v_proj"], "fan_in_fan_out": False,
                   "base_model_name_or_path": None}, f)
    return path
