"""A tiny GPT-2 built on the spot, for tests that need a real model behind a real server.

Nothing is downloaded: a byte-level BPE tokenizer is trained by `tokenizers` on the built-in corpus
below, and a 2-layer GPT-2 is initialised from a `transformers` config with a fixed torch seed. The
result is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) that `transformers serve`,
`from_pretrained` or vLLM can load by path.

Directories are cached by a content hash of everything that shapes them (the spec, the corpus, the
chat template, this builder's version and the library versions), so repeated runs reuse one build:

    from tests.support.tiny_model import build_tiny_model
    model_dir = build_tiny_model()            # ~/.cache/agent-coordinator/llm-test/tiny-gpt2-<hash>
    model_dir = build_tiny_model(tmp_path)    # or under a directory of your choosing

The weights are random, so the text it writes is gibberish; what tests get from it is real
tokenization, real generation, real token counts and real streaming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# Bump when the builder changes in a way the hashed inputs below do not capture.
BUILDER_VERSION = 2

CACHE_DIR_ENV = "LLM_TEST_MODEL_CACHE"

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
EOS_TOKEN = "<|end|>"
BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"

# One line per message; the assistant turn is left open when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = """\
A coordinator cluster replicates its state machine with Raft. The leader appends each command to
its log, sends it to the followers, and applies it once a majority has stored it. A follower that
misses heartbeats starts an election; the candidate with the most up-to-date log wins.
Tasks are submitted by clients, queued, and assigned to executors that hold a lease. An executor
that stops renewing its lease loses the task, and the scheduler assigns it again. Checkpoints let a
long task resume from its last completed step instead of starting from scratch.
Language model adapters send chat completions to a server that speaks the OpenAI protocol. They
retry on rate limits after the delay the server asks for, back off on server errors, give up after a
deadline, and count the prompt and completion tokens of every call.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. 0123456789 + - * / = ( ) [ ] { } , ; :
Hello! How are you today? I am fine, thank you. What is the answer? The answer is forty-two.
Please summarise the following text in one sentence. Write a short poem about distributed systems.
"""


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Every knob of the build; all of it goes into the cache key."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    # `transformers serve` raises max_new_tokens to at least 1024 when a request gives none, so
    # positions must cover prompt + 1024 generated tokens.
    n_positions: int = 2048
    vocab_size_max: int = 512
    seed: int = 1234
    # A short training run on the corpus (as user/assistant turns) so greedy decoding writes real
    # words and sometimes ends its turn, instead of repeating a special token that decodes to "".
    train_steps: int = 120
    train_batch: int = 8
    train_seq_len: int = 64
    train_lr: float = 5e-3
    # Default generation: greedy, so a request with temperature unset is deterministic too.
    do_sample: bool = False


DEFAULT_SPEC = TinyModelSpec()


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-coordinator" / "llm-test"


def cache_key(spec: TinyModelSpec = DEFAULT_SPEC) -> str:
    from importlib.metadata import version  # not the modules: a cache hit should not import torch

    material = json.dumps(
        {
            "builder": BUILDER_VERSION,
            "spec": dataclasses.asdict(spec),
            "corpus": CORPUS,
            "chat_template": CHAT_TEMPLATE,
            "special_tokens": SPECIAL_TOKENS,
            "eos": EOS_TOKEN,
            "bos": BOS_TOKEN,
            "pad": PAD_TOKEN,
            # A new library version may write a different format: build again rather than guess.
            "versions": [version("transformers"), version("tokenizers"), version("torch")],
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def build_tiny_model(cache_dir: str | os.PathLike | None = None, spec: TinyModelSpec = DEFAULT_SPEC) -> Path:
    """Return the directory of the tiny model for `spec`, building it under `cache_dir` if absent.

    The build goes to a temporary sibling directory that is renamed into place when complete, so a
    killed build never leaves a half-written model behind, and two concurrent builders both end
    with one complete directory."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"tiny-gpt2-{cache_key(spec)}"
    if (final / "BUILD_OK").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        _build_into(tmp, spec)
        (tmp / "BUILD_OK").write_text(json.dumps(dataclasses.asdict(spec)) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another builder won the race (or a stale, incomplete directory is in the way).
            if not (final / "BUILD_OK").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size_max,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def _build_into(out: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = _train_tokenizer(spec)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=spec.n_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    # transformers 5 names the class "TokenizersBackend", unknown to the 4.x a vLLM may pin;
    # "PreTrainedTokenizerFast" (an alias in 5.x) loads tokenizer.json in both.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["chat_template"] = CHAT_TEMPLATE  # also inline, for readers that ignore chat_template.jinja
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    ids = {t: raw.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)}
    config = GPT2Config(
        vocab_size=raw.get_vocab_size(),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel(config)
    _train(model, tokenizer, spec)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=spec.do_sample,
    )
    model.save_pretrained(out)


def _chat_corpus_ids(tokenizer) -> list[int]:
    """The corpus as alternating user/assistant turns rendered by the chat template, as one stream."""
    lines = [line.strip() for line in CORPUS.splitlines() if line.strip()]
    ids: list[int] = []
    for question, answer in zip(lines, lines[1:] + lines[:1]):
        ids += tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_dict=False,
        )
    return ids


def _train(model, tokenizer, spec: TinyModelSpec) -> None:
    import torch

    if spec.train_steps <= 0:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float reduction order, so the same weights
    try:
        data = torch.tensor(_chat_corpus_ids(tokenizer), dtype=torch.long)
        gen = torch.Generator().manual_seed(spec.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.train_lr)
        model.train()
        span = spec.train_seq_len
        for _ in range(spec.train_steps):
            starts = torch.randint(0, len(data) - span, (spec.train_batch,), generator=gen)
            batch = torch.stack([data[s : s + span] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # python -m tests.support.tiny_model [CACHE_DIR]
    import sys

    t0 = time.monotonic()
    path = build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"{path} ({time.monotonic() - t0:.2f} s)")
