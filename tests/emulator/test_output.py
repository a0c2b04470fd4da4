"""The built-in tokenizer and the output planner: deterministic, text-preserving, stop rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router.emulator.output import OutputRequest, plan_output
from router.emulator.tokenizer import BUILTIN_VOCAB, BuiltinTokenizer

TOK = BuiltinTokenizer()


@given(st.text(max_size=300))
def test_builtin_split_pieces_concatenate_to_the_text(text: str) -> None:
    ids, pieces = TOK.split(text)
    assert "".join(pieces) == text
    assert len(ids) == len(pieces)
    assert all(1000 <= i < BUILTIN_VOCAB for i in ids)
    assert TOK.encode_prompt(text, (), chat=False) == ids


def test_builtin_tokenizer_is_about_four_characters_a_token() -> None:
    text = "The emulator tokenizes ordinary English prose into word pieces, roughly. " * 20
    ids = TOK.encode_prompt(text, (), chat=False)
    assert 3.0 <= len(text) / len(ids) <= 6.0


def test_unknown_ids_still_have_text() -> None:
    assert TOK.piece(5).startswith(" ") and TOK.piece(123_456) != TOK.piece(123_457)


def _plan(want: OutputRequest, **kw: object) -> tuple[list[int], str, str, object]:
    plan = plan_output(
        TOK,
        [1, 2, 3],
        "abc",
        want,
        mode=kw.get("mode", "random"),  # type: ignore[arg-type]
        length=kw.get("length", "max"),
        pod_seed=0,
        choice=0,
    )  # type: ignore[arg-type]
    return plan.token_ids, "".join(plan.pieces), plan.finish_reason, plan.stop_reason


@given(st.integers(1, 64), st.integers(0, 3))
def test_plans_are_deterministic_and_honour_max_tokens(n: int, seed: int) -> None:
    want = OutputRequest(max_tokens=n, seed=seed)
    a, b = _plan(want), _plan(want)
    assert a == b
    assert len(a[0]) == n and a[2] == "length"


def test_stop_token_id_ends_the_output_after_min_tokens() -> None:
    ids, _, _, _ = _plan(OutputRequest(max_tokens=40))
    stop_id = ids[10]
    first = ids.index(stop_id)
    got, _, reason, stop = _plan(OutputRequest(max_tokens=40, stop_token_ids=(stop_id,)))
    assert len(got) == first + 1 and reason == "stop" and stop == stop_id


def test_random_length_stops_early_unless_ignore_eos() -> None:
    lengths = {len(_plan(OutputRequest(max_tokens=50, seed=s), length="random")[0])
               for s in range(20)}  # fmt: skip
    assert min(lengths) < 50
    ignore = OutputRequest(max_tokens=50, ignore_eos=True)
    assert len(_plan(ignore, length="random")[0]) == 50
