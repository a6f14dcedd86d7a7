"""The score store's keys: what makes two judgements the same, and the model's fingerprint.

**The key** of a judgement is sha256 over a version tag, the *result identity* as canonical JSON,
and the prompt's token ids (little-endian int32). The result identity is everything that decides
what the engine makes of a prompt, and nothing else:

- the engine part of `checkpoint.identity(job)`: dtype, quantization, enforce_eager,
  max_model_len, max_reasoning_tokens, fit, enable_prefix_caching, block_size, seed,
  trust_remote_code, samples, temperature, top_p (each left out at its greedy default, so that
  a greedy judgement keeps the key it had before these options existed), engine_args, and any
  option added later that `checkpoint` does not declare free (the pool, the batch sizes and the
  scheduler's limits are free there: they change no result, so they are not in the key either);
- the model's fingerprint (`model_fingerprint`) in place of `model` and `revision`: the same
  weights staged under another path are a hit, other weights under the same name are not.

Left out, because the prompt already carries them or they do not decide a judgement: the task
template and the instruction (they are in the prompt's token ids), the threshold (it decides only
`label` and `agreement`, which a reader recomputes from the samples' scores), the grades' cut
points and the aggregate (they decide only `grade` and `label`, recomputed from the samples'
scores likewise), the ids (the same
texts under a new `doc_id` are the same judgement), and the run's options that choose which pairs
are scored and what is written (input, columns, top_k, traces, labels). Any other non-free option
of the scoring or run part is kept, so a new option is in the key until it is declared free in
`checkpoint` or here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from ..config import GREEDY, RANK1_SCORER, EngineConfig, JobConfig, JobError
from ..model.prompt import query_text
from ..output.checkpoint import identity

KEY_TYPE = pa.binary(32)
_KEY_TAG = b"rank1-batch score key 1\0"
# Options of `checkpoint.identity` that decide no judgement (see the module's docstring).
_NOT_JUDGEMENT = {
    "engine": {"model", "revision"},
    "scoring": {"threshold", "grades", "task_template", "aggregate"},
    "run": {"input", "columns", "top_k", "write_traces", "labels", "labels_answered_only"},
}


# The parts of a job's identity that may decide a judgement: not the cascade in front of the scorer.
_JUDGED_PARTS = ("engine", "scoring", "run")
_JUDGED_BEFORE_OPTION = {"engine": GREEDY, "scoring": RANK1_SCORER}
log = logging.getLogger(__name__)


class UnresolvedModel(JobError):
    """The model cannot be fingerprinted, so no key can be made for its judgements."""


def result_identity(job: JobConfig, model_fingerprint: str) -> dict:
    """What decides a judgement apart from the prompt: the job's identity without the options
    that decide none, and the model's fingerprint in place of its name and revision."""
    kept = {
        part: {name: value for name, value in options.items()
               if name not in _NOT_JUDGEMENT.get(part, ()) and not _as_before(part, name, value)}
        for part, options in identity(job).items() if part in _JUDGED_PARTS
    }
    return {**kept, "model": model_fingerprint}


def _as_before(part: str, name: str, value) -> bool:
    """Whether an option has the value judgements had before it existed (greedy, by Rank1): such
    judgements keep the keys they had then."""
    before = _JUDGED_BEFORE_OPTION.get(part, {})
    return name in before and value == before[name]


def store_keys(result: dict, prompts: Iterable | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The key of each prompt (a list of token ids) under one result identity, as binary(32)."""
    if isinstance(prompts, pa.ChunkedArray):
        prompts = prompts.combine_chunks()
    # token ids fit int32 (a vocabulary is far smaller); the cast refuses any that do not
    prompts = prompts.cast(pa.list_(pa.int32())) if isinstance(prompts, pa.Array) else pa.array(prompts, pa.list_(pa.int32()))
    if prompts.null_count:
        raise ValueError("a prompt is null: only a pair with a prompt has a key")
    # `values` is the whole child array and `offsets` index into it, also for a slice
    offsets = prompts.offsets.to_numpy()
    ids = prompts.values.to_numpy(zero_copy_only=False).astype("<i4", copy=False)
    base = hashlib.sha256(_KEY_TAG)
    base.update(json.dumps(result, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    digests = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        digest = base.copy()
        digest.update(ids[start:end].tobytes())
        digests.append(digest.digest())
    return pa.array(digests, KEY_TYPE)


def store_key(result: dict, prompt_token_ids: Iterable[int]) -> bytes:
    """The key of one prompt under a result identity (sha256, 32 bytes)."""
    return store_keys(result, [list(prompt_token_ids)])[0].as_py()


def query_hashes(queries: Iterable | pa.Array | pa.ChunkedArray,
                 instructions: Iterable | pa.Array | pa.ChunkedArray | None = None) -> pa.Array:
    """int64 of the first 8 bytes of sha256 of each query as the prompt has it (instruction appended)."""
    queries = _as_list(queries)
    instructions = [None] * len(queries) if instructions is None else _as_list(instructions)
    if len(instructions) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(instructions)} instructions")
    found: dict[tuple, int] = {}
    hashes = []
    for pair in zip(queries, instructions):
        if pair not in found:
            if pair[0] is None:
                raise ValueError("a query is null: only a pair with a query has a key")
            text = query_text(*pair).encode("utf-8", "surrogatepass")
            found[pair] = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)
        hashes.append(found[pair])
    return pa.array(hashes, pa.int64())


def _as_list(values) -> list:
    return values.to_pylist() if isinstance(values, (pa.Array, pa.ChunkedArray)) else list(values)


def key_array(keys) -> pa.Array:
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return keys.cast(KEY_TYPE) if isinstance(keys, pa.Array) else pa.array(list(keys), KEY_TYPE)


# Files besides the weights that change what a model makes of a prompt, when present.
# The model's fingerprint.
_MODEL_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
}


_COMMIT = re.compile(r"[0-9a-f]{40}")
# Blocks of each weights file read besides its header: a checkpoint trained further keeps every
# shape, so its header is the same, but not its bytes at these places.
_SAMPLES = 8
_SAMPLE_BYTES = 4096


def model_fingerprint(engine: EngineConfig) -> str:
    """What identifies the model's weights and tokenizer.

    A local directory (the bundled `tiny` included): sha256 over each `*.safetensors` file's
    header (its 8-byte length and JSON) and a few blocks of its data, and over the tokenizer,
    config and chat template files present; not over all the weights, which may be tens of GB.
    A Hugging Face id: its commit, `--revision` when it is one, else as the hub resolves the
    revision now. Remote paths (`s3://...`) are not fingerprinted: stage the model locally.
    """
    path = engine.model_path
    if os.path.isdir(path):
        return "sha256:" + _directory_digest(Path(path))
    if "://" in path or os.path.exists(path):
        raise UnresolvedModel(f"--model {engine.model}: the score store fingerprints a local model directory or a "
                              "Hugging Face id; stage the model in a local directory")
    return f"hf:{engine.model}@{_hub_commit(engine)}"


def _directory_digest(directory: Path) -> str:
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise UnresolvedModel(f"--model {directory}: no *.safetensors weights, which the score store fingerprints")
    digest = hashlib.sha256()
    for file in weights:
        digest.update(file.name.encode() + b"\0" + _safetensors_summary(file))
    for file in sorted(directory.iterdir()):
        if file.is_file() and (file.name in _MODEL_FILES or file.name.startswith("chat_template")):
            content = file.read_bytes()
            digest.update(f"{file.name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def _safetensors_summary(file: Path) -> bytes:
    """The header (8-byte little-endian length, then JSON) and evenly spaced blocks of the data."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= size - 8:
            raise UnresolvedModel(f"{file}: not a safetensors file")
        parts = [head, handle.read(length)]
        start = 8 + length
        for sample in range(_SAMPLES):
            handle.seek(start + (size - start) * sample // _SAMPLES)
            parts.append(handle.read(_SAMPLE_BYTES))
    return b"".join(parts)


def _hub_commit(engine: EngineConfig) -> str:
    if engine.revision and _COMMIT.fullmatch(engine.revision):
        return engine.revision
    try:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(engine.model, revision=engine.revision).sha
    except Exception as error:  # offline, unreachable, unknown id or revision: one answer for all
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise UnresolvedModel(
            f"--model {engine.model}: the score store needs a resolvable model revision, and the Hugging Face hub "
            f"did not resolve {engine.revision or 'main'} ({reason}); give --revision COMMIT (its 40-character commit)"
        ) from None
    if not commit:
        raise UnresolvedModel(f"--model {engine.model}: the hub gave no commit; give --revision COMMIT")
    return commit
