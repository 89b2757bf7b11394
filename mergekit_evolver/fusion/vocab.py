"""Vocabulary mapping: every source token id gets one target token id.

A token is compared by the text it stands for, not by its spelling: each
tokenizer spells a space, a newline or a raw byte its own way ("▁" for
sentencepiece-style metaspace, "Ġ"/"Ċ" from GPT-2's byte-to-unicode alphabet,
"<0x0A>" for byte fallback, "##" for WordPiece continuations). `Markers`
reads those spellings off the tokenizer itself (its normalizer, pre-tokenizer
and decoder, and how it tokenizes a space when none of those says), and
`token_text` undoes them, so "Ġworld", "▁world" and " world" all become
" world". Raw bytes become the string that `bytes.decode("utf-8",
"surrogateescape")` gives: lossless, so a byte-level token holding half a
UTF-8 character still equals the byte-fallback token for the same byte.

The mapping (FuseLLM's vocab_mapping, Wan et al. 2024): special tokens by
role (eos to eos, bos to bos, ...); then an exact match of the texts; then the
target token nearest by edit distance (rapidfuzz's Levenshtein), ties to the
earliest candidate. `map_vocab` is pure; `token_table` is the only part that
reads a tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import numpy as np

# How a mapped id was found, per source id (VocabMap.how).
NONE, SPECIAL, EXACT, NEAREST = 0, 1, 2, 3
# A token serving several roles (GPT-2's <|endoftext|> is bos and eos) takes the
# first: the end of a text is what a causal LM predicts, never its beginning.
ROLES = ("eos", "bos", "unk", "pad")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet):
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _as_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Markers:
    """How one tokenizer spells what a token stands for."""

    byte_level: bool = False  # every character is one byte of GPT-2's alphabet
    byte_fallback: bool = False  # "<0xNN>" tokens are raw bytes
    spaces: tuple[str, ...] = ()  # strings that stand for a space ("▁")
    continuation: Optional[str] = None  # WordPiece: "##" marks a word's inner piece


def _components(spec: Any) -> Iterator[dict]:
    """Every normalizer / pre-tokenizer / decoder dict inside a Sequence tree."""
    if isinstance(spec, dict):
        yield spec
        for value in spec.values():
            yield from _components(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from _components(value)


def _pattern(spec: dict) -> Optional[str]:
    pattern = spec.get("pattern")
    if isinstance(pattern, dict):
        return pattern.get("String")
    return pattern if isinstance(pattern, str) else None


def markers_from_spec(spec: Mapping) -> Markers:
    """Markers from a `tokenizers` JSON spec (tokenizer.json's body)."""
    byte_level = byte_fallback = False
    spaces: list[str] = []
    continuation = None
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        for comp in _components(spec.get(part)):
            kind = comp.get("type")
            if kind == "ByteLevel":
                byte_level = True
            elif kind == "Metaspace" and comp.get("replacement"):
                spaces.append(comp["replacement"])
            elif kind == "ByteFallback":
                byte_fallback = True
            elif kind == "WordPiece" and part == "decoder":
                continuation = comp.get("prefix", "##")
            elif kind == "Replace":
                # Llama-2 style: the normalizer writes spaces as "▁", the decoder turns them back.
                pat, content = _pattern(comp), comp.get("content")
                if part == "normalizer" and pat == " " and content:
                    spaces.append(content)
                elif part == "decoder" and content == " " and pat:
                    spaces.append(pat)
    model = spec.get("model") or {}
    if model.get("byte_fallback"):
        byte_fallback = True
    return Markers(byte_level, byte_fallback, tuple(dict.fromkeys(spaces)), continuation)


def _probe_space(tokenizer) -> tuple[str, ...]:
    """The spelling of a space, from how the tokenizer tokenizes "a b": what
    stands between the "a" and the "b" ("▁" for sentencepiece; nothing to undo
    for a tokenizer that keeps spaces as they are), kept only if
    `convert_tokens_to_string` renders it as a space."""
    try:
        ids = tokenizer("a b", add_special_tokens=False)["input_ids"]
        joined = "".join(t for t in tokenizer.convert_ids_to_tokens(ids) if isinstance(t, str))
        first, last = joined.find("a"), joined.rfind("b")
        mark = joined[first + 1 : last] if 0 <= first < last else ""
        if mark in ("", " "):
            return ()
        rendered = tokenizer.convert_tokens_to_string(["a", mark + "b"])
    except Exception:  # a tokenizer that cannot say: its texts stay as spelt
        return ()
    return (mark,) if rendered.endswith(" b") else ()


def detect_markers(tokenizer) -> Markers:
    """Markers of a transformers tokenizer: from its `tokenizers` backend when
    it has one, otherwise (a slow tokenizer) from how it tokenizes a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        found = markers_from_spec(json.loads(backend.to_str()))
        if found.byte_level or found.spaces or found.continuation:
            return found
        return Markers(False, found.byte_fallback, _probe_space(tokenizer), None)
    return Markers(spaces=_probe_space(tokenizer))


def token_text(token: str, markers: Markers) -> str:
    """What one (non-special) token stands for, with spaces as real spaces."""
    if markers.byte_level and all(c in _UNICODE_TO_BYTE for c in token):
        return _as_text(bytes(_UNICODE_TO_BYTE[c] for c in token))
    if markers.byte_fallback:
        hit = _BYTE_FALLBACK.match(token)
        if hit:
            return _as_text(bytes([int(hit.group(1), 16)]))
    text = token
    for mark in markers.spaces:
        text = text.replace(mark, " ")
    if markers.continuation:
        text = text[len(markers.continuation):] if text.startswith(markers.continuation) else " " + text
    return text


@dataclass(frozen=True)
class TokenTable:
    """A vocabulary as the mapping sees it, indexed by token id.

    texts[i]: what token i stands for (None for a special token or an id with
    no token); roles: special id -> role ("eos", ..., or "special:<content>");
    fallback: byte-fallback ids, chosen only after ordinary tokens."""

    texts: tuple[Optional[str], ...]
    roles: Mapping[int, str] = field(default_factory=dict)
    fallback: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.texts)

    def role_ids(self) -> dict[str, int]:
        """role -> the lowest id holding it."""
        out: dict[str, int] = {}
        for i in sorted(self.roles):
            out.setdefault(self.roles[i], i)
        return out


def token_table(tokenizer, size: Optional[int] = None) -> TokenTable:
    """The table of a transformers tokenizer; `size` (the model's output width,
    which may exceed the tokenizer) pads it with ids that have no token."""
    n = len(tokenizer)
    size = max(n, size or 0)
    markers = detect_markers(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    roles: dict[int, str] = {}
    for role in reversed(ROLES):  # the first role listed wins
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n:
            roles[tid] = role
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    literal = set()
    for tid, tok in added.items():
        if getattr(tok, "special", False):
            roles.setdefault(int(tid), f"special:{tok.content}")
        else:
            literal.add(int(tid))  # added words match the raw text: no markers to undo
    texts: list[Optional[str]] = []
    fallback = set()
    for tid, tok in enumerate(tokens):
        if tid in roles or not isinstance(tok, str):
            texts.append(None)
        elif tid in literal:
            texts.append(tok)
        else:
            texts.append(token_text(tok, markers))
            if markers.byte_fallback and _BYTE_FALLBACK.match(tok):
                fallback.add(tid)
    texts.extend([None] * (size - n))
    return TokenTable(tuple(texts), roles, frozenset(fallback))


@dataclass(frozen=True)
class VocabMap:
    """ids[s]: the target id for source id s (-1: none); how[s]: NONE,
    SPECIAL, EXACT or NEAREST."""

    ids: np.ndarray
    how: np.ndarray

    def counts(self) -> dict[str, int]:
        names = {NONE: "none", SPECIAL: "special", EXACT: "exact", NEAREST: "nearest"}
        return {names[k]: int((self.how == k).sum()) for k in names}


def _candidates(target: TokenTable) -> list[int]:
    """Target ids a text may map to, in order of preference: ordinary tokens by
    id, then byte-fallback ones (a tokenizer never emits <0x61> for "a")."""
    ids = [i for i, t in enumerate(target.texts) if t is not None]
    return sorted(ids, key=lambda i: (i in target.fallback, i))


def map_vocab(source: TokenTable, target: TokenTable, *, chunk_cells: int = 1 << 22) -> VocabMap:
    """The source -> target token mapping (see the module docstring)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    ids = np.full(len(source), -1, dtype=np.int64)
    how = np.full(len(source), NONE, dtype=np.int8)
    target_roles = target.role_ids()
    for sid, role in source.roles.items():
        if role in target_roles:
            ids[sid], how[sid] = target_roles[role], SPECIAL
    order = _candidates(target)
    exact: dict[str, int] = {}
    for tid in order:
        exact.setdefault(target.texts[tid], tid)
    pending = []
    for sid, text in enumerate(source.texts):
        if text is None:
            continue
        if text in exact:
            ids[sid], how[sid] = exact[text], EXACT
        else:
            pending.append(sid)
    if pending and order:
        choices = [target.texts[t] for t in order]
        rows = max(1, chunk_cells // len(choices))  # bounds the distance matrix
        for start in range(0, len(pending), rows):
            part = pending[start : start + rows]
            dist = process.cdist([source.texts[s] for s in part], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
            best = dist.argmin(axis=1)  # the first minimum: ties go to the earliest candidate
            for sid, col in zip(part, best):
                ids[sid], how[sid] = order[int(col)], NEAREST
    return VocabMap(ids, how)
