"""Grammar-constrained decoding (`response_format`, forced tool calls) that stays lossless with
speculation.

The engine is llguidance: a Rust core that computes a token mask in microseconds (about 10-30 us
for JSON on the default model's 49k vocabulary), compiles JSON Schema and Lark grammars (Lark may
embed a JSON schema, which tools.py uses for tool calls), and is made for speculative decoding: one
matcher walks a draft tree with `try_consume_tokens` / `rollback`, and `validate_tokens` /
`compute_ff_tokens` look ahead without committing. It is maintained by the guidance team and used by
vLLM, SGLang and llama.cpp; its wheels need no build step.

A request keeps one matcher, advanced by what each step commits. Speculation stays exactly plain
constrained decoding because:
- **rows**: each verified row is masked with the grammar's state after that row's own path (the
  tree is walked depth first: consume a node's token, mask its row, descend, roll back), so
  acceptance (verify.py) sees in every row what a constrained decoder would see there;
- **drafts**: before the budget picks the subtree, every node the grammar rejects after its
  parent's path is dropped with its subtree (`allowed_subtree`): no node a constrained decoder could
  never emit is verified;
- **ends**: an id that ends generation (the model's EOS, the request's stop ids) is allowed where
  the grammar may end (or where its own text fits); a draft holds nothing below it.

Rows no emitted token can reach (below an end, or below a rejected node when a tree was not pruned)
are left as they are: acceptance never reads them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aded.tree import DraftTree

__all__ = ["Grammar", "GrammarState", "grammar_tokenizer", "response_format_schema", "json_schema_lark",
           "JSON_WHITESPACE"]

_MISSING = object()


def grammar_tokenizer(tokenizer, vocab_size: int | None = None):
    """llguidance's view of a fast Hugging Face tokenizer (about 1 s for 50k tokens, 3 s for 150k:
    build it once per model). `vocab_size`: the model's logits width, when larger than the
    tokenizer's (padded ids are never allowed)."""
    import llguidance.hf

    n_vocab = max(int(vocab_size or 0), len(tokenizer))
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the grammar engine (llguidance) cannot use this tokenizer: {exc}") from exc


def response_format_schema(response_format: Any) -> dict | bool | None:
    """The JSON schema an answer must follow under OpenAI's `response_format`, or None for free text.

    `{"type": "text"}` -> None; `{"type": "json_object"}` -> any JSON object;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}` -> the
    schema (enforced whatever `strict` says: a constrained decoder has no reason not to)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be an object such as {{\"type\": \"json_object\"}}, "
                         f"got {response_format!r}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError("response_format.json_schema must be an object with a \"schema\"")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"response_format.json_schema.name must be a string, got {name!r}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict must be true or false, got {strict!r}")
    schema = spec.get("schema", _MISSING)
    if schema is _MISSING:
        raise ValueError("response_format.json_schema.schema is required")
    if not isinstance(schema, (Mapping, bool)):
        raise ValueError(f"response_format.json_schema.schema must be a JSON schema object, got {schema!r}")
    return dict(schema) if isinstance(schema, Mapping) else schema


# Between JSON tokens: at most one line break and 32 spaces or tabs. Compact and pretty-printed JSON
# both fit, and a small model cannot loop on whitespace (with llguidance's default, any run of
# whitespace, a random model never closes its first object). A schema's "x-guidance" may change it.
JSON_WHITESPACE = r"(\r?\n)?[\x20\x09]{0,32}"


def with_json_options(schema: Mapping | bool) -> dict:
    """`schema` with aded's default JSON options under "x-guidance" (the schema's own win)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    own = schema.get("x-guidance") or {}
    if not isinstance(own, Mapping):
        raise ValueError(f'a schema\'s "x-guidance" must be an object of llguidance options, got {own!r}')
    return {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE, **own}}


def json_schema_lark(schema: Mapping | bool) -> str:
    """A Lark right-hand side that matches JSON following `schema` (llguidance's `%json`)."""
    return "%json " + json.dumps(with_json_options(schema), ensure_ascii=False)


@dataclass(frozen=True)
class Grammar:
    """A checked llguidance grammar for one tokenizer, shared by any number of requests."""

    text: str  # llguidance's grammar, as `LLMatcher.grammar_from_*` writes it
    tokenizer: Any = field(compare=False, repr=False)  # llguidance.LLTokenizer (`grammar_tokenizer`)

    @classmethod
    def from_json_schema(cls, schema: Mapping | bool, tokenizer, what: str = "the JSON schema") -> Grammar:
        from llguidance import LLMatcher

        try:
            text = LLMatcher.grammar_from_json_schema(json.dumps(with_json_options(schema)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{what} is not a usable JSON schema: {exc}") from exc
        return cls.checked(text, tokenizer, what)

    @classmethod
    def from_lark(cls, lark: str, tokenizer, what: str = "the grammar") -> Grammar:
        from llguidance import LLMatcher

        return cls.checked(LLMatcher.grammar_from_lark(lark), tokenizer, what)

    @classmethod
    def checked(cls, text: str, tokenizer, what: str) -> Grammar:
        """ValueError naming `what` and llguidance's reason when the grammar cannot be used."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise ValueError(f"{what} is not usable: {messages[0] if messages else 'invalid grammar'}")
        return cls(text, tokenizer)

    def start(self, vocab_size: int, end_ids: Iterable[int]) -> GrammarState:
        return GrammarState(self, vocab_size, end_ids)


class GrammarState:
    """One request's matcher: masks a step's rows, prunes drafts, and follows what steps commit."""

    def __init__(self, grammar: Grammar, vocab_size: int, end_ids: Iterable[int]) -> None:
        from llguidance import LLMatcher

        self.end_ids = frozenset(int(t) for t in end_ids)
        if not self.end_ids:
            raise ValueError("a grammar needs an id that ends generation (the model's EOS or a stop id)")
        self.matcher = LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the grammar is not usable: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self._eos = int(grammar.tokenizer.eos_token)  # its bit in a mask: the grammar may end here
        if self._eos >= vocab_size:
            raise ValueError(f"the grammar's EOS id {self._eos} is outside the vocabulary ({vocab_size} ids)")
        self._end_columns = np.array(sorted(t for t in self.end_ids if t < vocab_size), dtype=np.int64)

    def allowed_subtree(self, tree: DraftTree) -> DraftTree:
        """`tree` without the nodes the grammar rejects after their parent's path (and their
        subtrees), and without anything below an end id."""
        if len(tree) == 0:
            return tree
        return tree.subtree(self._reachable(tree))

    def mask(self, scores: torch.Tensor, tree: DraftTree) -> None:
        """-inf, in place, on the ids the grammar forbids after each row's path: `scores` [1 + k,
        vocab], row 0 after the root, row i + 1 after node i."""
        rows = [0]
        masks = [self.matcher.compute_bitmask()]

        def visit(node: int) -> None:
            rows.append(node + 1)
            masks.append(self.matcher.compute_bitmask())

        self._reachable(tree, visit)
        bits = np.invert(np.frombuffer(b"".join(masks), dtype=np.uint8).reshape(len(rows), -1))
        width = min(bits.shape[1] * 8, self.vocab_size)
        filled = np.asarray(rows)  # [r] rows in the order visited (depth first, not index order)
        banned = np.zeros((len(scores), self.vocab_size), dtype=bool)  # [1 + k, vocab]
        banned[filled, width:] = True  # ids the grammar's tokenizer does not know
        unpacked = np.unpackbits(bits, axis=1, count=width, bitorder="little")  # [r, width] 1 = banned
        banned[filled, :width] = unpacked.view(bool)
        may_end = ~banned[filled, self._eos]  # [r] the grammar may end after the row's path
        banned[filled, self._eos] = True  # the EOS ends generation only as one of the end ids
        banned[np.ix_(filled, self._end_columns)] &= ~may_end[:, None]
        scores.masked_fill_(torch.from_numpy(banned), float("-inf"))

    def commit(self, token_ids: Iterable[int]) -> None:
        """A step emitted `token_ids`; an end id ends generation, so nothing after it is followed."""
        for token in token_ids:
            if token in self.end_ids:
                return
            if not self.matcher.consume_token(int(token)):
                raise RuntimeError(f"the grammar rejected committed id {token}: {self.matcher.get_error()}")

    def _may_end(self, token: int) -> bool:
        """May end id `token` come next? Where the grammar may end, or where its text fits."""
        return self.matcher.is_accepting() or self.matcher.validate_tokens([token]) == 1

    def _reachable(self, tree: DraftTree, visit: Callable[[int], None] | None = None) -> list[int]:
        """The nodes a constrained decoder could emit, in depth-first order. `visit(node)` is called
        for each one that is not an end id while the matcher holds that node's path (ends are
        never consumed: rolling an EOS back is not reliable in llguidance 1.x)."""
        children, tokens, parents = tree.children, tree.token_ids.tolist(), tree.parents.tolist()
        kept: list[int] = []
        path: list[int] = []  # nodes whose tokens the matcher holds beyond the committed ones
        stack = list(reversed(children.get(-1, {}).values()))
        try:
            while stack:
                node = stack.pop()
                while path and path[-1] != parents[node]:
                    path.pop()
                    self.matcher.rollback(1)
                token = tokens[node]
                if token in self.end_ids:
                    if self._may_end(token):
                        kept.append(node)
                    continue
                if self.matcher.try_consume_tokens([token]) != 1:
                    continue
                path.append(node)
                kept.append(node)
                if visit is not None:
                    visit(node)
                stack.extend(reversed(children.get(node, {}).values()))
        finally:
            if path:
                self.matcher.rollback(len(path))
        return kept

