"""Test infrastructure for the LLM adapters (issue 5): a tiny model built on the spot, a real
OpenAI-compatible server (`transformers serve`) serving it, and a fault-injecting reverse proxy.

Nothing here downloads anything: the model and its tokenizer are built locally from a seed and a
built-in corpus, and the server runs with HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1."""
