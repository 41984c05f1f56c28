"""Engine adapters: the prefill/decode handoff, Hugging Face transformers, and vLLM (KV connector v1)."""
