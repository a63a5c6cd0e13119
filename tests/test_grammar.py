"""Grammars (response_format) stay lossless with speculation: greedy output under any draft tree is
plain constrained greedy decoding (an independent one-token-at-a-time loop over llguidance), sampling
samples the constrained distribution, and no node the grammar rejects is ever verified.

Tiny random models speak the default model's tokenizer (byte-level BPE, 49k ids): the grammar forces
valid output whatever the weights."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from distribution import assert_follows
from offline_tokenizers import default_tokenizer, ids_of
from test_processors import WideDrafter
from test_processors import drafters_for as processor_drafters
from trees import tree_of

from aded.backends.hf import HFRunner
from aded.budget import VerifyAll
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters import make_drafter
from aded.drafters.base import Drafter, NoDrafter
from aded.grammar import Grammar, grammar_tokenizer, response_format_schema
from aded.processors import LogitsProcessor
from aded.tree import DraftTree, TreeBuilder

EOS = 2  # the default tokenizer's EOS (<|im_end|>)
VOCAB = 49152
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3}}}
ANSWER_LARK = 'start: "The answer is " ("yes" | "no" | /[0-9]{1,3}/) "."'


@functools.cache
def ll_tokenizer():
    return grammar_tokenizer(default_tokenizer(), VOCAB)


@functools.cache
def grammar(name: str) -> Grammar:
    if name == "lark":
        return Grammar.from_lark(ANSWER_LARK, ll_tokenizer())
    return Grammar.from_json_schema({"json_object": {"type": "object"}, "person": PERSON}[name], ll_tokenizer())


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=3)


def prompt_ids(text: str) -> list[int]:
    return ids_of(default_tokenizer(), text)


# ---------------------------------------------------------------------------- references
def validate(value, schema: dict) -> None:
    """The JSON Schema keywords PERSON uses, checked the plain way (AssertionError if not valid)."""
    if "enum" in schema:
        assert value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", ())) <= set(value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"])
        for key, item in value.items():
            validate(item, schema.get("properties", {}).get(key, {}))
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    elif kind == "integer":
        assert isinstance(value, int) and schema.get("minimum", value) <= value <= schema.get("maximum", value)
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
        for item in value:
            validate(item, schema.get("items", {}))


def allowed_ids(matcher) -> np.ndarray:
    """[vocab] bool: the ids a fresh llguidance matcher allows next (its EOS bit means "may end")."""
    bias = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)[:VOCAB]
    return bias > 0


def fresh_matcher(grammar_: Grammar, consumed=()):
    from llguidance import LLMatcher

    matcher = LLMatcher(grammar_.tokenizer, grammar_.text, log_level=0)
    assert matcher.consume_tokens(list(consumed)) or not consumed
    return matcher


def constrained_greedy(model, prompt: list[int], grammar_: Grammar, max_new: int) -> list[int]:
    """Plain constrained greedy decoding: the whole context through the model, the grammar's mask,
    the argmax, one token at a time."""
    matcher = fresh_matcher(grammar_)
    generated: list[int] = []
    with torch.inference_mode():
        while len(generated) < max_new:
            logits = model(torch.tensor([prompt + generated])).logits[0, -1].numpy()
            token = int(np.where(allowed_ids(matcher), logits, -np.inf).argmax())
            generated.append(token)
            if token == EOS:
                break
            assert matcher.consume_token(token)
    return generated


# ---------------------------------------------------------------------------- drafters
class GrammarWalkDrafter(Drafter):
    """Trees the grammar mostly allows but the model mostly does not choose: the true continuation to
    a random depth, then random allowed tokens (EOS where the grammar may end), plus junk tokens.
    Deep rows below wrong-but-valid nodes are where a mask in the wrong state would show."""

    name = "grammar-walk"

    def __init__(self, reference: list[int], prompt_len: int, grammar_: Grammar, seed: int) -> None:
        self.reference, self.prompt_len, self.grammar = reference, prompt_len, grammar_
        self.rng = np.random.default_rng(seed)

    def propose(self, context_ids, max_nodes):
        done = list(context_ids[self.prompt_len:])
        truth = self.reference[len(done):]
        builder = TreeBuilder(max_nodes)
        for _ in range(4):
            depth = int(self.rng.integers(0, len(truth) + 1))
            path = truth[:depth]
            matcher = fresh_matcher(self.grammar, done + path)
            for _ in range(3):
                choices = np.flatnonzero(allowed_ids(matcher))
                if not len(choices):
                    break
                token = int(self.rng.choice(choices))
                path = path + [token]
                if token == EOS or not matcher.consume_token(token):
                    break
            builder.add_path(path + self.rng.integers(0, VOCAB, 2).tolist())  # junk below, pruned
        return builder.build()


def drafters_for(expected: list[int], prompt_len: int, grammar_: Grammar) -> dict[str, Drafter]:
    """test_processors' drafters (none, an oracle, random junk, wide trees, pld) and a grammar walk."""
    return {**processor_drafters(expected, prompt_len, VOCAB),
            "grammar-walk": GrammarWalkDrafter(expected, prompt_len, grammar_, 3)}


def decoder(model, drafter, runner=None) -> SpeculativeDecoder:
    return SpeculativeDecoder(runner or HFRunner(model), drafter, [EOS], VerifyAll())


# ---------------------------------------------------------------------------- greedy = plain constrained decoding
@pytest.mark.parametrize("name", ["json_object", "person", "lark"])
def test_greedy_with_speculation_equals_plain_constrained_decoding(model, name):
    prompt = prompt_ids('Reply in JSON. {"name": "Ann", "age": 7} is an example; say "The answer is 42."')
    config = GenerationConfig(max_new_tokens=80, max_draft_nodes=48, grammar=grammar(name))
    expected = constrained_greedy(model, prompt, grammar(name), 80)
    for drafter_name, drafter in drafters_for(expected, len(prompt), grammar(name)).items():
        result = decoder(model, drafter).generate(prompt, config)
        assert result.token_ids == expected, drafter_name
        if drafter_name == "oracle" and len(expected) > 8:
            assert result.stats.mean_accepted_tokens > 2
    if name != "json_object":  # a random model writes strings forever; these grammars bound them
        assert expected[-1] == EOS and result.finish_reason == "stop"
        text = default_tokenizer().decode(expected[:-1])
        if name == "person":
            validate(json.loads(text), PERSON)
        else:
            assert text.startswith("The answer is ") and text.endswith(".")


def test_json_object_output_parses_when_the_model_closes_it():
    """A random model rarely closes a string; this one (seed chosen) closes its object at once."""
    model = tiny_llama(vocab_size=VOCAB, seed=13, logit_scale=3.0)
    prompt = prompt_ids("JSON:")
    config = GenerationConfig(max_new_tokens=64, max_draft_nodes=24, grammar=grammar("json_object"))
    result = decoder(model, make_drafter("pld")).generate(prompt, config)
    assert result.finish_reason == "stop" and result.token_ids[-1] == EOS
    assert isinstance(json.loads(default_tokenizer().decode(result.token_ids[:-1])), dict)
    assert result.token_ids == constrained_greedy(model, prompt, grammar("json_object"), 64)


class RecordingRunner(HFRunner):
    """An HF runner that keeps every tree it verifies."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.trees: list[DraftTree] = []

    def verify(self, seq, root_id, tree):
        self.trees.append(tree)
        return super().verify(seq, root_id, tree)


class RecordingDrafter(Drafter):
    """Another drafter's proposals, with the context and the tree of each."""

    name = "recording"

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.proposals: list[tuple[list[int], DraftTree]] = []

    def propose(self, context_ids, max_nodes):
        tree = self.inner.propose(context_ids, max_nodes)
        self.proposals.append((list(context_ids), tree))
        return tree


def grammar_accepts(grammar_: Grammar, generated: list[int], path: list[int]) -> bool:
    """Would plain constrained decoding ever emit `path` after `generated`? An EOS only last, where
    the grammar may end."""
    matcher = fresh_matcher(grammar_, generated)
    for i, token in enumerate(path):
        if token == EOS:
            return i == len(path) - 1 and matcher.is_accepting()
        if not matcher.consume_token(token):
            return False
    return True


@pytest.mark.parametrize("name", ["person", "lark"])
def test_no_verified_node_is_rejected_by_the_grammar(model, name):
    prompt = prompt_ids("Answer:")
    expected = constrained_greedy(model, prompt, grammar(name), 40)
    proposed_bad = verified = 0
    for inner in (GrammarWalkDrafter(expected, len(prompt), grammar(name), 5),
                  WideDrafter(expected, len(prompt), 6, VOCAB)):
        runner, drafter = RecordingRunner(model), RecordingDrafter(inner)
        result = decoder(model, drafter, runner).generate(
            prompt, GenerationConfig(max_new_tokens=40, max_draft_nodes=48, grammar=grammar(name)))
        assert result.token_ids == expected
        assert len(runner.trees) == len(drafter.proposals) == result.stats.steps
        for (context, proposed), verified_tree in zip(drafter.proposals, runner.trees):
            generated = context[len(prompt):]
            for node in range(len(verified_tree)):
                assert grammar_accepts(grammar(name), generated, verified_tree.path_tokens(node)), node
            verified += len(verified_tree)
            proposed_bad += sum(not grammar_accepts(grammar(name), generated, proposed.path_tokens(node))
                                for node in range(len(proposed)))
    assert verified > 10 and proposed_bad > 10  # both verified and pruned nodes were many


# ---------------------------------------------------------------------------- rows and pruning, node by node
def breadth_first(tree: DraftTree) -> DraftTree:
    """The same tree with its nodes renumbered by depth (another topological order)."""
    order = np.argsort(tree.depths, kind="stable")
    new_index = {int(old): new for new, old in enumerate(order)}
    parents = [new_index[int(p)] if p >= 0 else -1 for p in tree.parents[order]]
    return DraftTree(tree.token_ids[order], np.asarray(parents))


@pytest.mark.parametrize("seed", range(6))
def test_each_row_is_masked_in_its_own_context_and_pruning_keeps_what_may_be_emitted(seed):
    """Against a fresh matcher per path: every row's allowed ids (end ids where the grammar may end),
    and the pruned tree = the nodes whose whole path the grammar accepts."""
    rng = np.random.default_rng(seed)
    grammar_ = grammar(["person", "lark", "json_object"][seed % 3])
    text = ['{"name": "Bo", "age": 3', "The answer is 4", '{"a": [1, {"b": "c"'][seed % 3]
    committed = ids_of(default_tokenizer(), text)[: int(rng.integers(0, 8))]
    end_ids = [EOS, 17]  # a stop id too: an ordinary character, allowed as text or where it may end
    state = grammar_.start(VOCAB, end_ids)
    state.commit(committed)
    builder = TreeBuilder()
    for _ in range(6):  # random walks over allowed ids, a junk token now and then
        matcher, path = fresh_matcher(grammar_, committed), []
        for _ in range(int(rng.integers(1, 6))):
            choices = np.flatnonzero(allowed_ids(matcher))
            token = int(rng.choice(choices)) if rng.random() < 0.8 and len(choices) else int(rng.integers(0, VOCAB))
            path.append(token)
            if token in end_ids or not matcher.consume_token(token):
                break
        builder.add_path(path + ([EOS] if rng.random() < 0.3 else []) + [int(rng.integers(0, VOCAB))])
    tree = breadth_first(builder.build())  # the walk is depth first: rows must still land by index

    def accepts(node: int) -> bool:
        path = tree.path_tokens(node)
        matcher = fresh_matcher(grammar_, committed)
        for i, token in enumerate(path):
            if token in end_ids:  # allowed as its own text or where the grammar may end; ends the path
                if i < len(path) - 1 or not (matcher.is_accepting() or matcher.validate_tokens([token])):
                    return False
                return True
            if not matcher.consume_token(token):
                return False
        return True

    kept = [node for node in range(len(tree)) if accepts(node)]
    pruned = state.allowed_subtree(tree)
    assert [pruned.path_tokens(n) for n in range(len(pruned))] == [tree.path_tokens(n) for n in kept]
    assert 0 < len(kept) < len(tree)
    scores = torch.randn(1 + len(tree), VOCAB, generator=torch.Generator().manual_seed(seed))
    processor = LogitsProcessor.for_request(GenerationConfig(grammar=grammar_), [5], VOCAB, end_ids)
    processor.commit(committed)
    masked = processor(scores, tree)
    for row in [0] + [node + 1 for node in kept if tree.token_ids[node] not in end_ids]:
        matcher = fresh_matcher(grammar_, committed + (tree.path_tokens(row - 1) if row else []))
        expected = allowed_ids(matcher)
        may_end = expected[EOS]
        expected[end_ids] |= may_end
        assert torch.equal(torch.isfinite(masked[row]), torch.from_numpy(expected)), row
        assert torch.equal(masked[row][expected], scores[row][expected])


# ---------------------------------------------------------------------------- sampling
SAMPLE_LARK = 'start: ("yes" | "no" | "maybe") "!"?'
PROMPT = [40, 50, 60]


@functools.cache
def small_tokenizer():
    """A Llama-2 style tokenizer of 358 ids (characters and byte fallbacks): sampling thousands of
    times stays cheap, and each answer has several spellings (a character or its byte)."""
    from offline_tokenizers import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


def chars(text: str) -> list[int]:
    return [small_tokenizer().convert_tokens_to_ids(c) for c in text]


class AllowedAndJunkDrafter(Drafter):
    """After the first token, one fixed tree: the rest of each answer (valid after one first token
    only), its "!" as a character and as a byte, EOS where it is allowed or early, and junk."""

    name = "allowed-and-junk"

    def __init__(self) -> None:
        byte_bang = small_tokenizer().convert_tokens_to_ids("<0x21>")
        self.tree = tree_of([chars("es") + [EOS], chars("es!") + [EOS], chars("es") + [byte_bang],
                                          chars("o!") + [EOS], chars("aybe"), chars("o") + [EOS],
                                          chars("xyz"), [EOS]])

    def propose(self, context_ids, max_nodes):
        return self.tree if len(context_ids) == len(PROMPT) + 1 else DraftTree.empty()


def exact_constrained_distribution(model, grammar_: Grammar, max_new: int) -> dict[tuple[int, ...], float]:
    """P(output) of plain constrained sampling (temperature 1), walked over every allowed sequence."""
    vocab = model.config.vocab_size
    out: dict[tuple[int, ...], float] = {}

    def walk(generated: list[int], p: float) -> None:
        if len(generated) == max_new or (generated and generated[-1] == EOS):
            out[tuple(generated)] = p
            return
        matcher = fresh_matcher(grammar_, generated)
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + generated])).logits[0, -1].float()
        allowed = torch.from_numpy(np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)[:vocab] > 0)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        for token in torch.nonzero(probs > 0).flatten().tolist():
            walk(generated + [token], p * probs[token].item())

    walk([], 1.0)
    return out


@pytest.mark.parametrize("drafter", [NoDrafter(), AllowedAndJunkDrafter()], ids=["no-drafts", "tree"])
def test_sampled_distribution_under_a_grammar_is_plain_constrained_samplings(drafter):
    vocab = len(small_tokenizer())
    model = tiny_llama(vocab_size=vocab, seed=5, logit_scale=8.0)
    grammar_ = Grammar.from_lark(SAMPLE_LARK, grammar_tokenizer(small_tokenizer(), vocab))
    expected = exact_constrained_distribution(model, grammar_, 8)
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(cell[-1] == EOS for cell in expected)
    runs = decoder(model, drafter)
    samples = [tuple(runs.generate(PROMPT, GenerationConfig(max_new_tokens=8, do_sample=True, seed=seed,
                                                             grammar=grammar_)).token_ids)
               for seed in range(1000)]
    assert_follows(samples, expected)
    texts = {small_tokenizer().decode(list(s[:-1])) for s in samples}
    assert texts <= {"yes", "no", "maybe", "yes!", "no!", "maybe!"} and len(texts) >= 3


# ---------------------------------------------------------------------------- requests refused, fast path kept
@pytest.mark.parametrize("response_format,match", [
    ("json", "response_format must be an object"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict"),
])
def test_bad_response_formats_are_refused_naming_the_field(response_format, match):
    with pytest.raises(ValueError, match=match):
        response_format_schema(response_format)


@pytest.mark.parametrize("schema,match", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"type": "object", "properties": {"a": {"$ref": "#/defs/nope"}}}, "does not exist"),
    ({"type": "string", "pattern": "(unclosed"}, "pattern|regex|parse"),
])
def test_unusable_schemas_are_refused_naming_the_problem(schema, match):
    with pytest.raises(ValueError, match=f"the schema is not usable: .*({match})"):
        Grammar.from_json_schema(schema, ll_tokenizer(), "the schema")


def test_response_format_shapes():
    assert response_format_schema(None) is None and response_format_schema({"type": "text"}) is None
    assert response_format_schema({"type": "json_object"}) == {"type": "object"}
    spec = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    assert response_format_schema(spec) == PERSON


@pytest.mark.parametrize("field", ["ignore_eos", "min_tokens"])
def test_fields_that_fight_the_grammar_over_the_end_are_refused(field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(grammar=grammar("person"), **{field: True if field == "ignore_eos" else 3})


def test_a_grammar_needs_an_end_id():
    with pytest.raises(ValueError, match="ends generation"):
        grammar("person").start(VOCAB, end_ids=())


def test_no_grammar_no_processing():
    """Without a grammar (or other processors) the loop builds no processor: no cost per step."""
    assert LogitsProcessor.for_request(GenerationConfig(), [1, 2], VOCAB, [EOS]) is None
    processor = LogitsProcessor.for_request(GenerationConfig(repetition_penalty=1.2), [1, 2], VOCAB, [EOS])
    tree = DraftTree.chain([5, 6])
    assert processor.grammar is None and processor.allowed_subtree(tree) is tree


def test_api_response_format_json_schema(model):
    from aded.api import Aded

    lm = Aded(model, default_tokenizer(), drafter="pld", budget="off")
    spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = lm.generate("Describe a person.", response_format=spec, max_new_tokens=120, temperature=0)
    validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "stop" and out.tool_calls is None and out.content == out.text
    plain = Aded(model, default_tokenizer(), drafter="none", budget="off")
    assert plain.generate("Describe a person.", response_format=spec, max_new_tokens=120).token_ids == out.token_ids
    with pytest.raises(ValueError, match="response_format's schema is not usable"):
        lm.generate("x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}})
    with pytest.raises(ValueError, match="either a grammar or response_format"):
        lm.generation_config(grammar=grammar("person"), response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="x-guidance"):
        lm.generation_config(response_format={"type": "json_schema", "json_schema": {"schema": {"x-guidance": 1}}})


# ---------------------------------------------------------------------------- the real default model
E2E_PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                             "city": {"type": "string", "maxLength": 20}}}
E2E_REQUESTS = [
    ("Give me a JSON object describing a cat with its name, age and colour.", {"type": "json_object"}, None),
    ("Describe a person called Ann, 31, from Oslo, as JSON.",
     {"type": "json_schema", "json_schema": {"name": "person", "schema": E2E_PERSON}}, E2E_PERSON),
]


@pytest.mark.e2e
def test_default_model_json_mode_parses_and_equals_plain_decoding(capsys):
    """JSON mode on the default model and drafter: parseable JSON, schema answers valid, the same
    tokens as without speculation; mean accepted tokens reported (the second time a request is seen,
    the drafter has learned its answer)."""
    import aded

    lm = aded.load()
    plain = aded.Aded(lm.runner, lm.tokenizer, drafter="none", budget="off")
    report = []
    for prompt, response_format, schema in E2E_REQUESTS:
        fields = dict(response_format=response_format, max_new_tokens=64, temperature=0)
        reference = plain.generate(prompt, **fields)
        for attempt in ("first", "repeat"):
            out = lm.generate(prompt, **fields)
            assert out.token_ids == reference.token_ids and out.finish_reason == "stop"
            value = json.loads(out.text)
            assert isinstance(value, dict)
            if schema is not None:
                validate(value, schema)
            report.append(f"{response_format['type']} ({attempt}): mean accepted tokens "
                          f"{out.stats.mean_accepted_tokens:.2f} with {lm.drafter.name}, 1.00 without; "
                          f"{len(out.token_ids)} tokens")
    with capsys.disabled():
        print("\n" + "\n".join(report))
