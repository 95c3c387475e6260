"""The selection core on hand-made rows: ties, all incorrect, single source, NaN and null rewards, the margin band,
the source rules, and a brute-force cross-check on random rows."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest

from fusechat.config import BuildConfig
from fusechat.selection import select


def prompts(*rows: tuple[str, str, str]) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": p, "domain": d, "split": s} for p, d, s in rows])


def cands(*rows: tuple) -> pa.Table:
    """(prompt_id, source, sample_index, reward[, correct[, truncated[, empty]]])"""
    out = []
    for r in rows:
        r = (*r, *(None, False, False)[len(r) - 4 :])
        out.append(
            dict(
                zip(("prompt_id", "source", "sample_index", "reward", "correct", "truncated", "empty"), r, strict=True)
            )
        )
    schema = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("source", pa.string()),
            ("sample_index", pa.int32()),
            ("reward", pa.float64()),
            ("correct", pa.bool_()),
            ("truncated", pa.bool_()),
            ("empty", pa.bool_()),
        ]
    )
    return pa.Table.from_pylist(out, schema=schema)


def picks(table: pa.Table, *cols: str) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in cols), strict=True))


RULES = BuildConfig(margin=(0.01, 0.1), max_length=None)


def test_sft_takes_the_global_best_and_ignores_nan_null_truncated_empty():
    p = prompts(("a", "chat", "sft"))
    c = cands(
        ("a", "m1", 0, 0.30),
        ("a", "m2", 0, 0.50),
        ("a", "m2", 1, float("nan")),
        ("a", "m1", 1, None),
        ("a", "m3", 0, 0.90, None, True),
        ("a", "m3", 1, 0.80, None, False, True),
    )
    sel = select(p, c, RULES, seed=1)
    assert picks(sel.sft, "prompt_id", "source", "sample_index", "reward") == [("a", "m2", 0, 0.5)]
    assert sel.excluded == {"nan_reward": 1, "null_reward": 1, "truncated": 1, "empty": 1}
    kept = select(p, c, BuildConfig(max_length=None, drop_truncated=False, drop_empty=False), seed=1)
    assert picks(kept.sft, "source", "sample_index") == [("m3", 0)]


def test_a_response_the_reward_model_saw_in_part_is_not_a_candidate():
    p = prompts(("a", "chat", "sft"), ("b", "chat", "dpo"))
    c = cands(("a", "m1", 0, 0.9), ("a", "m1", 1, 0.3), ("b", "m1", 0, 0.5), ("b", "m1", 1, 0.45), ("b", "m1", 2, 0.2))
    c = c.append_column("reward_truncated", pa.array([True, False, False, False, True]))
    sel = select(p, c, RULES, seed=1)
    assert picks(sel.sft, "sample_index", "reward") == [(1, 0.3)]  # not the cut 0.9
    assert picks(sel.dpo, "chosen_index", "rejected_index") == [(0, 1)]  # not the cut 0.2 as rejected
    assert sel.excluded == {"reward_truncated": 2}
    # even when drop_truncated (responses cut by max_tokens) is off: the reward belongs to another text
    assert select(p, c, BuildConfig(max_length=None, drop_truncated=False), seed=1).excluded == {"reward_truncated": 2}


def test_math_sft_only_among_correct_and_all_incorrect_dropped():
    p = prompts(("a", "math", "sft"), ("b", "math", "sft"), ("c", "math", "sft"))
    c = cands(
        ("a", "m1", 0, 0.9, False),
        ("a", "m2", 0, 0.2, True),
        ("a", "m2", 1, 0.5, True),
        ("b", "m1", 0, 0.9, False),
        ("b", "m2", 0, 0.8, False),
        ("c", "m1", 0, float("nan"), True),
    )
    sel = select(p, c, BuildConfig(verified_domains={"math": "math"}, max_length=None), seed=0)
    assert picks(sel.sft, "prompt_id", "source", "sample_index") == [("a", "m2", 1)]
    assert sel.dropped["sft"] == {"no_acceptable_response": 1, "no_usable_response": 1}
    assert sel.verified == {"math": "math"}


def test_verification_is_inferred_from_non_null_correct():
    p = prompts(("a", "code", "sft"))
    c = cands(("a", "m1", 0, 0.9, False), ("a", "m1", 1, 0.1, True), ("a", "m1", 2, 0.95, None))
    sel = select(p, c, RULES, seed=0)
    assert picks(sel.sft, "sample_index") == [(1,)]
    assert sel.verified == {"code": "inferred"}
    assert sel.excluded == {"unverified": 1}


def test_ties_are_seeded_and_independent_of_row_order():
    p = prompts(*[(f"p{i}", "chat", "sft") for i in range(40)])
    rows = [(f"p{i}", src, k, 0.5) for i in range(40) for src in ("m1", "m2") for k in range(2)]
    first = picks(select(p, cands(*rows), RULES, seed=7).sft, "prompt_id", "source", "sample_index")
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert picks(select(p, cands(*shuffled), RULES, seed=7).sft, "prompt_id", "source", "sample_index") == first
    other = picks(select(p, cands(*rows), RULES, seed=8).sft, "prompt_id", "source", "sample_index")
    assert other != first  # another seed breaks ties differently
    assert {s for _, s, _ in first} == {"m1", "m2"}  # not always the alphabetically first source


def test_dpo_pairs_within_one_source_and_margin_band():
    p = prompts(("in", "chat", "dpo"), ("wide", "chat", "dpo"), ("narrow", "chat", "dpo"), ("mixed", "chat", "dpo"))
    c = cands(
        # in band: m1 0.51 vs 0.41 (0.1 exactly, float error notwithstanding); m2 has the global best but 0.5 gap
        ("in", "m1", 0, 0.51),
        ("in", "m1", 1, 0.41),
        ("in", "m1", 2, 0.45),
        ("in", "m2", 0, 0.95),
        ("in", "m2", 1, 0.45),
        ("wide", "m1", 0, 0.9),
        ("wide", "m1", 1, 0.1),
        ("narrow", "m1", 0, 0.5),
        ("narrow", "m1", 1, 0.505),
        ("mixed", "m1", 0, 0.9),
        ("mixed", "m1", 1, 0.1),
        ("mixed", "m2", 0, 0.5),
        ("mixed", "m2", 1, 0.5),
    )
    sel = select(p, c, RULES, seed=0)
    assert picks(sel.dpo, "prompt_id", "source", "chosen_index", "rejected_index") == [("in", "m1", 0, 1)]
    assert sel.dpo.column("margin")[0].as_py() == pytest.approx(0.1)
    assert sel.dropped["dpo"] == {"margin_above_band": 1, "margin_below_band": 1, "margin_outside_band": 1}
    assert sel.sft.num_rows == 0
    assert sorted(sel.candidate_margins.round(3).tolist()) == [0.0, 0.005, 0.1, 0.5, 0.8, 0.8]


def test_dpo_single_response_per_source_gives_no_pair():
    p = prompts(("a", "chat", "dpo"))
    c = cands(("a", "m1", 0, 0.50), ("a", "m2", 0, 0.45), ("a", "m3", 0, 0.40))
    sel = select(p, c, RULES, seed=0)
    assert sel.dpo.num_rows == 0
    assert sel.dropped["dpo"] == {"no_same_source_pair": 1}


def test_math_dpo_chosen_correct_rejected_incorrect():
    p = prompts(
        ("a", "math", "dpo"), ("allwrong", "math", "dpo"), ("allright", "math", "dpo"), ("split", "math", "dpo")
    )
    c = cands(
        ("a", "m1", 0, 0.60, True),
        ("a", "m1", 1, 0.65, False),
        ("a", "m1", 2, 0.55, True),
        ("a", "m1", 3, 0.58, False),
        ("allwrong", "m1", 0, 0.6, False),
        ("allwrong", "m1", 1, 0.55, False),
        ("allright", "m1", 0, 0.6, True),
        ("allright", "m1", 1, 0.55, True),
        ("split", "m1", 0, 0.6, True),
        ("split", "m2", 0, 0.55, False),
    )
    sel = select(p, c, BuildConfig(verified_domains={"math": "math"}, max_length=None), seed=0)
    # chosen: best correct (0.60); rejected: lowest incorrect (0.58); the higher-reward incorrect 0.65 is not chosen
    assert picks(sel.dpo, "prompt_id", "chosen_index", "rejected_index") == [("a", 0, 3)]
    assert sel.dropped["dpo"] == {"no_acceptable_response": 1, "no_rejected_response": 1, "no_same_source_pair": 1}


@pytest.mark.parametrize(("rule", "expected"), [("largest_margin", "m2"), ("highest_chosen", "m1")])
def test_pair_source_rules(rule, expected):
    p = prompts(("a", "chat", "dpo"))
    c = cands(
        ("a", "m1", 0, 0.90),
        ("a", "m1", 1, 0.88),
        ("a", "m2", 0, 0.60),
        ("a", "m2", 1, 0.52),
        ("a", "m3", 0, 0.30),
        ("a", "m3", 1, 0.0),
    )
    sel = select(p, c, BuildConfig(pair_source_rule=rule, max_length=None), seed=0)
    assert picks(sel.dpo, "source") == [(expected,)]
    two = select(p, c, BuildConfig(pair_source_rule=rule, pairs_per_prompt=2, max_length=None), seed=0)
    assert picks(two.dpo, "source") == [("m1",), ("m2",)]  # both in-band sources, sorted by source


def test_random_rule_is_seeded_per_prompt():
    p = prompts(*[(f"p{i}", "chat", "dpo") for i in range(30)])
    rows = [(f"p{i}", s, k, 0.5 - 0.02 * k) for i in range(30) for s in ("m1", "m2", "m3") for k in range(2)]
    rules = BuildConfig(pair_source_rule="random", max_length=None)
    a = picks(select(p, cands(*rows), rules, seed=1).dpo, "source")
    assert a == picks(select(p, cands(*reversed(rows)), rules, seed=1).dpo, "source")
    assert a != picks(select(p, cands(*rows), rules, seed=2).dpo, "source")
    assert {s for (s,) in a} == {"m1", "m2", "m3"}


def test_sft_only_domains_and_splits_are_disjoint():
    p = prompts(
        ("z1", "chinese", "dpo"),
        ("z2", "chinese", "sft"),
        ("c1", "chat", "sft"),
        ("c2", "chat", "dpo"),
        ("none", "chat", "sft"),
    )
    rows = [(pid, "m1", k, 0.5 - 0.05 * k) for pid in ("z1", "z2", "c1", "c2") for k in range(2)]
    sel = select(p, cands(*rows), BuildConfig(sft_only_domains=["chinese"], max_length=None), seed=0)
    assert picks(sel.sft, "prompt_id") == [("z2",), ("c1",)]
    assert picks(sel.dpo, "prompt_id") == [("c2",)]
    assert sel.dropped == {"sft": {"no_samples": 1}, "dpo": {"sft_only_domain": 1}}


def test_unknown_prompt_is_an_error():
    with pytest.raises(ValueError, match="prompt_id 'x'"):
        select(prompts(("a", "chat", "sft")), cands(("x", "m1", 0, 0.5)), RULES, seed=0)


def test_random_rows_match_a_brute_force_reading_of_the_rules():
    rng = random.Random(3)
    ids = [(f"p{i}", rng.choice(["chat", "math"]), rng.choice(["sft", "dpo"])) for i in range(300)]
    rows = []
    for pid, dom, _ in ids:
        for src in rng.sample(["m1", "m2", "m3"], rng.randint(1, 3)):
            for k in range(rng.randint(1, 4)):
                reward = rng.choice([None, float("nan"), *[round(rng.random() * 0.2, 2) for _ in range(6)]])
                correct = rng.choice([True, False, None if rng.random() < 0.1 else True]) if dom == "math" else None
                rows.append((pid, src, k, reward, correct, rng.random() < 0.1, rng.random() < 0.05))
    rules = BuildConfig(margin=(0.01, 0.1), verified_domains={"math": "math"}, max_length=None)
    sel = select(prompts(*ids), cands(*rows), rules, seed=5)

    def usable(r):
        return r[3] is not None and not math.isnan(r[3]) and not r[5] and not r[6]

    domain = {pid: dom for pid, dom, _ in ids}
    split = {pid: s for pid, _, s in ids}

    def ok_chosen(r):
        return usable(r) and (r[4] is True if domain[r[0]] == "math" else True)

    def ok_rejected(r):
        return usable(r) and (r[4] is False if domain[r[0]] == "math" else True)

    by_key = {(r[0], r[1], r[2]): r for r in rows}
    sft = picks(sel.sft, "prompt_id", "source", "sample_index", "reward")
    for pid, src, k, reward in sft:
        assert split[pid] == "sft" and ok_chosen(by_key[(pid, src, k)])
        assert reward == max(r[3] for r in rows if r[0] == pid and ok_chosen(r))
    expected = {pid for pid, _, s in ids if s == "sft" and any(r[0] == pid and ok_chosen(r) for r in rows)}
    assert {x[0] for x in sft} == expected and len(sft) == len(expected)

    for pid, src, ci, ri, cr, rr, m in picks(
        sel.dpo, "prompt_id", "source", "chosen_index", "rejected_index", "chosen_reward", "rejected_reward", "margin"
    ):
        own = [r for r in rows if r[0] == pid and r[1] == src]
        assert split[pid] == "dpo" and ok_chosen(by_key[(pid, src, ci)]) and ok_rejected(by_key[(pid, src, ri)])
        assert cr == max(r[3] for r in own if ok_chosen(r))
        assert rr == min(r[3] for r in own if ok_rejected(r))
        assert ci != ri and 0.01 - 1e-9 <= m <= 0.1 + 1e-9 and m == pytest.approx(cr - rr)
    dpo_prompts = [x[0] for x in picks(sel.dpo, "prompt_id")]
    assert len(dpo_prompts) == len(set(dpo_prompts))
    dropped = sum(sel.dropped["dpo"].values())
    assert dropped + len(dpo_prompts) == sum(1 for _, _, s in ids if s == "dpo")
    assert sum(sel.dropped["sft"].values()) + len(sft) == sum(1 for _, _, s in ids if s == "sft")


def test_a_source_with_identical_samples_makes_no_pair_and_such_prompts_are_counted():
    p = prompts(("a", "chat", "dpo"), ("b", "chat", "dpo"), ("c", "chat", "sft"))
    rows = [
        ("a", "m1", 0, 0.50), ("a", "m1", 1, 0.45),  # m1 repeats itself on a: no pair from it
        ("a", "m2", 0, 0.40), ("a", "m2", 1, 0.35),
        ("b", "m1", 0, 0.50), ("b", "m1", 1, 0.45),  # only m1 answered b, identically: b is dropped
        ("c", "m1", 0, 0.50), ("c", "m1", 1, 0.45),  # SFT is not affected
    ]  # fmt: skip
    c = cands(*rows)
    same = [r[0] in ("a", "b") and r[1] == "m1" or r[0] == "c" for r in rows]
    c = c.append_column("identical_samples", pa.array(same))
    sel = select(p, c, RULES, seed=0)
    assert picks(sel.dpo, "prompt_id", "source") == [("a", "m2")]
    assert sel.dropped["dpo"] == {"identical_samples": 1}
    assert picks(sel.sft, "prompt_id", "reward") == [("c", 0.5)]


def test_too_long_responses_are_excluded_and_the_contenders_cover_every_pair_that_could_take_over():
    p = prompts(("s", "chat", "sft"), ("d", "chat", "dpo"))
    rows = [
        ("s", "m1", 0, 0.9), ("s", "m1", 1, 0.8), ("s", "m2", 0, 0.7),
        ("d", "m1", 0, 0.50), ("d", "m1", 1, 0.48),  # in the band (0.02): kept
        ("d", "m2", 0, 0.60), ("d", "m2", 1, 0.55), ("d", "m2", 2, 0.30),  # above it (0.3): may enter it
        ("d", "m3", 0, 0.50), ("d", "m3", 1, 0.499),  # below it: never
    ]  # fmt: skip
    c = cands(*rows)
    sel = select(p, c, RULES, seed=0)
    assert picks(sel.dpo, "source") == [("m1",)]
    assert set(sel.contenders.tolist()) == {0, 3, 4, 5, 7}  # SFT's best, the kept pair, the above-band pair
    # m2's worst answer is too long: its pair narrows to 0.05, into the band, and wins on the larger gap
    long = c.append_column("too_long", pa.array([True] + [False] * 6 + [True] + [False] * 2))
    sel = select(p, long, RULES, seed=0)
    assert picks(sel.sft, "sample_index", "reward") == [(1, 0.8)]  # the next best takes the over-long one's place
    assert sel.excluded == {"too_long": 2}
    assert picks(sel.dpo, "source", "chosen_index", "rejected_index") == [("m2", 0, 1)]
