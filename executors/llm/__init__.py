"""Shared machinery of the LLM executors (Cloud.ru FM, local vLLM): prompt templates
(`templates`), output parsing with repair (`parsing`), retries/breaker/health (`resilience`),
tokens and cost (`accounting`), a response cache (`cache`), the chat-API port and its openai
adapter (`client`) with an in-memory fake (`fake`), secret masking (`secrets`), errors
(`errors`) and the adapter itself (`adapter.LLMAdapter`). See executors/llm/README.md."""
