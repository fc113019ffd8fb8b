"""The evidence protocol end to end on a tiny random model (real training, callback, removal, evaluation and
caching; only the pool's minimum size is lowered), its keys and atomic results, and summarize against hand-computed
numbers."""

import io
import json
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model

from sqsd_callback.offline import load_adapter
from sqsd_lab.data import generate_responses
from sqsd_lab.evidence import baselines, files, judges, poison, protocol, report, screen
from sqsd_lab.evidence.protocol import Lab, Run, Runner, Settings, condition, expand, summarize
from sqsd_lab.finetune import lora_config
from sqsd_lab.tiny import tiny_base, word_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }} w90 {% endfor %}"
TINY = Settings(pool=8, epochs=1.0, batch_size=4, rank=2, max_length=24, harmful_prompts=3, benign_risky=3, tasks=3,
                heldout_records=3, eval_tokens=4, filter_k="drops", calibration_seeds=(100,))
CONDITIONS = ("drops", "drift_stop", "filter:keyword")


def words(seed: int, n: int) -> str:
    """n random words of the word tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, 90, (n,), generator=g).tolist())


def records(start: int, n: int, **extra) -> list[dict]:
    """n prompt/response records of random words."""
    return [{"prompt": words(start + i, 3), "response": words(10_000 + start + i, 6), **extra} for i in range(n)]


def adapters(folder, model) -> None:
    """Random danger/, safety/ and aligned/ LoRA adapters of the tiny model (nonzero B)."""
    for seed, name in enumerate(("danger", "safety", "aligned"), start=10):  # not a run's init seed
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(2))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(str(folder / name))
        peft_model.unload()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    model, tokenizer = tiny_base(), word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    directions = tmp_path_factory.mktemp("directions")
    adapters(directions, model)
    tasks = [{"prompt": "w5 w6", "answer": "11", "kind": "sum3"}] * 3
    return Lab(model, tokenizer, directions, clean=records(0, 12), held_out=records(100, 3),
               poison_sets={"identity shifting": records(200, 8, kind="identity shifting"),
                            "reworded identity shifting": records(250, 8, kind="reworded identity shifting")},
               harmful=[words(300 + i, 3) for i in range(3)], risky=[words(400 + i, 3) for i in range(3)],
               tasks=tasks, mask_records=records(500, 4), anchors=records(600, 3), refusals=records(700, 3))


@pytest.fixture
def counted(monkeypatch):
    """The pool minimum lowered for tiny pools; train_lora calls counted."""
    monkeypatch.setattr(poison, "MIN_POOL", 8)
    calls = []
    real = protocol.train_lora

    def train(*args, **kwargs):
        calls.append(kwargs.get("callbacks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "train_lora", train)
    return calls


def test_whole_pipeline_is_cached_and_consistent(lab, counted, tmp_path):
    runs = expand([(["identity shifting"], [0.25], CONDITIONS, [0, 1])], TINY)
    names = [r.condition for r in runs]
    assert names.index("calibration") < names.index("drift_stop") and names.index("drops") < names.index(
        "filter:keyword")  # dependencies first
    results = Runner(lab, tmp_path).run_all(runs)
    assert len(counted) == len(runs) - 1  # every run trains once, θ_0 never
    assert Runner(lab, tmp_path).run_all(runs) == results and len(counted) == len(runs) - 1  # all read from cache
    by = {(r["condition"], r["seed"]): r for r in results}
    for seed in (0, 1):
        drops, kept = by["drops", seed], by["filter:keyword", seed]
        k = len(set(drops["removed_before"]) | set(drops["dropped_online"]))
        assert len(kept["removed_before"]) == k and kept["dropped_online"] == []  # the filter removes exactly k
        assert kept["pool"] == 8 and kept["poison_in_pool"] == 2 and kept["recall"] is not None
        stop = by["drift_stop", seed]
        calibration = [r for r in results if r["condition"] == "calibration"]
        assert stop["drift_threshold"] == max(r["max_drift"] for r in calibration)
    calibrated = json.loads(next(tmp_path.glob("calibration-*.json")).read_text())
    assert calibrated["seeds"] == [100] and not {0, 1} & set(calibrated["seeds"])
    reported = {r["seed"] for r in results if r["condition"] not in ("calibration", "theta_0")}
    assert reported == {0, 1}
    theta = by["theta_0", 0]
    assert set(theta["outcomes"]) == {"phrase", "likelihood"} and len(theta["outcomes"]["phrase"]) == 3
    assert set(theta["scores"]) == {"likelihood"} and [m > 0 for m in theta["scores"]["likelihood"]] == [
        o == "compliance" for o in theta["outcomes"]["likelihood"]]  # the margin behind each verdict
    wrapped = [poison.AOA.prompt(p) for p in lab.harmful]  # the persona evaluation, asked again by hand, with the
    budget = TINY.eval_tokens + len(lab.tokenizer(poison.AOA.opener, add_special_tokens=False)["input_ids"])  # opener
    aoa = theta["personas"]["identity shifting"]
    assert aoa["responses"] == generate_responses(lab.model, lab.tokenizer, wrapped, budget)
    assert aoa["phrase_judge"] == protocol.PERSONA_PHRASE_JUDGE and aoa["outcomes"]["phrase"] == [
        v.outcome for v in judges.PhraseJudge().judge(lab.harmful, aoa["responses"], [poison.AOA.context] * 3)]
    assert aoa["scores"]["likelihood"] == pytest.approx(
        judges.LikelihoodJudge(lab.model, lab.tokenizer).margins(wrapped), abs=1e-6)
    reworded = [x.prompt(p) for x, p in zip(poison.REWORDED, lab.harmful)]  # the three prompts in personas 1, 2, 3
    longest = max(len(lab.tokenizer(x.opener, add_special_tokens=False)["input_ids"]) for x in poison.REWORDED)
    assert theta["personas"]["reworded identity shifting"]["responses"] == generate_responses(
        lab.model, lab.tokenizer, reworded, TINY.eval_tokens + longest)
    trained = load_adapter(lab.model, tmp_path / by["drops", 1]["key"] / "train")
    try:
        assert by["drops", 1]["personas"]["identity shifting"]["responses"] == generate_responses(
            trained, lab.tokenizer, wrapped, budget)
    finally:
        trained.unload()
    both = {"identity shifting", "reworded identity shifting"}  # θ_0 and clean as references for each persona kind
    assert all(set(r["personas"]) == (both if r["condition"] in ("theta_0", "clean") else {"identity shifting"})
               for r in results if r["condition"] != "calibration")
    assert not any("personas" in r for r in results if r["condition"] == "calibration")
    summary = summarize(results)
    assert {r["condition"] for r in summary["rows"]} == {"theta_0", "clean", *CONDITIONS}
    assert "likelihood~phrase" in summary["judges"]["kappa"]
    row = next(r for r in summary["rows"] if r["condition"] == "drops")
    assert row["seeds"] == 2 and set(row["equivalent_to_clean"]) == {"phrase", "likelihood"}
    for seed in (0, 1):  # the monitor's own ranking, recounted by hand from its scores.jsonl
        drops = by["drops", seed]
        pool = lab.pool("identity shifting", 0.25, seed, TINY)
        kept = [i for i in range(len(pool)) if i not in drops["removed_before"]]
        lines = (tmp_path / drops["key"] / "train" / "sqsd" / "scores.jsonl").read_text().splitlines()
        first, danger = {}, {}
        for row in map(json.loads, lines):
            first.setdefault(kept[row["index"]], row["sqsd"])
            danger.setdefault(kept[row["index"]], row["danger"])
        top = sorted(first, key=lambda i: -first[i])[:2]
        assert drops["ranking"]["recall"] == sum(pool[i]["poison"] for i in top) / 2
        top = sorted(danger, key=lambda i: -danger[i])[:2]
        assert drops["ranking"]["by_term"]["danger"]["recall"] == sum(pool[i]["poison"] for i in top) / 2
        pairs = [(a, b) for a in danger for b in danger if pool[a]["poison"] and not pool[b]["poison"]]
        assert drops["ranking"]["by_term"]["danger"]["auroc"] == pytest.approx(sum(
            (danger[a] > danger[b]) + 0.5 * (danger[a] == danger[b]) for a, b in pairs) / len(pairs))
        assert drops["ranking"]["k"] == 2 and drops["ranking"]["scored"] == len(kept)
        assert by["filter:keyword", seed]["ranking"] is None  # no monitor, no scores
        thirds = drops["by_length"]["ranking"]  # the ranking's top k, found again third by third
        assert sum(t["poison"] for t in thirds) == 2 and sum(
            (t["recall"] or 0) * t["poison"] for t in thirds) == pytest.approx(drops["ranking"]["recall"] * 2)
        removed = by["filter:keyword", seed]["removed_before"]  # none where the drops removed none (k: theirs)
        assert by["filter:keyword", seed]["by_length"]["removal"] == (protocol.by_length(pool, removed)
                                                                      if removed else None)
    path = tmp_path / by["drops", 0]["key"] / "result.json"  # a result cached before rankings were kept
    path.write_text(json.dumps({k: v for k, v in by["drops", 0].items() if k not in protocol.DERIVED}))
    assert Runner(lab, tmp_path).result(runs[names.index("drops")]) == by["drops", 0]
    assert json.loads(path.read_text())["ranking"] == by["drops", 0]["ranking"]  # and written back
    path.write_text(json.dumps({k: v for k, v in by["drops", 0].items() if k != "personas"}))  # ... or persona
    assert Runner(lab, tmp_path).result(runs[names.index("drops")]) == by["drops", 0] and len(counted) == len(
        runs) - 1  # judged again, not trained again
    judged, clean_0 = lab.persona, runs[names.index("clean")]
    lab.persona = None  # from here on a persona evaluation would fail: the old format is read, not judged again
    try:
        old = {k: v for k, v in by["clean", 0].items() if k != "personas"}
        first = by["clean", 0]["personas"]["identity shifting"]  # cached when AOA was the only persona, and judged
        old["persona"] = {**{k: v for k, v in first.items() if k != "phrase_judge"},  # without it as context
                          "outcomes": {**first["outcomes"], "phrase": ["compliance"] * 3}}
        assert first["outcomes"]["phrase"] != ["compliance"] * 3  # so a verdict not judged again would show
        old_path = tmp_path / by["clean", 0]["key"] / "result.json"
        old_path.write_text(json.dumps({**old, "personas": {"reworded identity shifting": by["clean", 0]["personas"][
            "reworded identity shifting"]}}))
        with pytest.raises(ValueError, match="judged by an older phrase judge"):
            Runner(None, tmp_path).result(clean_0)  # --cached-only cannot judge again: it says so
        assert Runner(lab, tmp_path).result(clean_0) == by["clean", 0]  # judged again from the stored responses
        assert "persona" not in json.loads(old_path.read_text())  # and written back in the new format
    finally:
        lab.persona = judged
    restored = tmp_path / "restored"  # a cached clean run without its training folder, lacking a persona kind
    (restored / by["clean", 1]["key"]).mkdir(parents=True)
    (restored / by["clean", 1]["key"] / "result.json").write_text(json.dumps(
        {**by["clean", 1], "personas": {"identity shifting": by["clean", 1]["personas"]["identity shifting"]}}))
    with pytest.raises(FileNotFoundError, match="has no adapter .* reworded identity shifting.s persona prompts"):
        Runner(lab, restored).result(next(r for r in runs if r.condition == "clean" and r.seed == 1))


def test_online_ranking_by_hand(tmp_path):
    """Pool of 6, poison at 1 and 4, position 0 removed before training: training examples 0..4 are positions
    1..5; the second epoch's scores are not the ranking's; k = 2 takes positions 1 and 4."""
    pool = [{"response": " ".join(["w"] * n), "poison": i in (1, 4)} for i, n in enumerate([9, 5, 1, 3, 4, 2])]
    (tmp_path / "sqsd").mkdir()
    rows = [(0, 0.9, 0.1, -0.8), (1, 0.1, 0.6, 0.5), (2, 0.5, 0.5, 0.0), (3, 0.8, 0.9, 0.1), (4, 0.2, 0.2, 0.0),
            (1, 5.0, 5.0, 0.0)]  # index, sqsd = danger − safety, danger, safety
    (tmp_path / "sqsd" / "scores.jsonl").write_text("".join(json.dumps(
        {"index": i, "sqsd": v, "danger": d, "safety": s}) + "\n" for i, v, d, s in rows))
    ranking = protocol.online_ranking(tmp_path, [1, 2, 3, 4, 5], pool)
    # positions 1..5: danger [.1 .6 .5 .9 .2] top 2 → 4, 2 (recall 1/2), poison ranks 1 and 5 → AUROC (6 − 3)/6;
    # −safety [.8 −.5 0 −.1 0] top 2 → 1, then the tie at 0 → 3 (lower position), poison ranks 5 and 2 → (7 − 3)/6;
    # words [5 1 3 4 2] top 2 → 1, 4 (recall 1), AUROC 1
    assert ranking == {"recall": 1.0, "benign_removed": 0.0, "auroc": 1.0, "k": 2, "scored": 5,
                       "length_rho": pytest.approx(1.0), "top": [1, 4],
                       "by_term": {"danger": {"recall": 0.5, "auroc": 0.5},
                                   "safety": {"recall": 0.5, "auroc": pytest.approx(2 / 3)},
                                   "length": {"recall": 1.0, "auroc": 1.0}}}
    pool[2]["poison"] = True  # a third poison record, ranked last: recall 2 of 3, one benign (position 3) removed
    ranking = protocol.online_ranking(tmp_path, [1, 2, 3, 4, 5], pool)
    assert ranking["recall"] == pytest.approx(2 / 3) and ranking["benign_removed"] == pytest.approx(1 / 3)
    assert protocol.online_ranking(tmp_path / "none", [1], pool) is None


def test_by_length_by_hand():
    """Words 9 5 1 3 4 2 at positions 0..5: thirds {2, 5}, {3, 4}, {1, 0}; poison at 1 and 4; 1 and 3 removed."""
    pool = [{"response": " ".join(["w"] * n), "poison": i in (1, 4)} for i, n in enumerate([9, 5, 1, 3, 4, 2])]
    assert protocol.by_length(pool, [1, 3]) == [
        {"words": [1, 2], "records": 2, "poison": 0, "recall": None, "benign_removed": 0.0},
        {"words": [3, 4], "records": 2, "poison": 1, "recall": 0.0, "benign_removed": 1.0},
        {"words": [5, 9], "records": 2, "poison": 1, "recall": 1.0, "benign_removed": 0.0}]


def test_keys_change_with_every_setting(monkeypatch):
    run = Run("identity shifting", 0.1, "drops", 0, TINY)
    assert run.key == Run("identity shifting", 0.1, "drops", 0, replace(TINY)).key  # stable
    others = [replace(run, poison="disjoint harmful"), replace(run, p=0.2), replace(run, condition="random"),
              replace(run, seed=1), *(replace(run, settings=replace(TINY, **{f: v})) for f, v in
                                      (("pool", 32), ("epochs", 2.0), ("learning_rate", 1e-3), ("filter_k", "poison"),
                                       ("calibration_seeds", (7,)), ("eval_tokens", 5)))]
    keys = {run.key, *(o.key for o in others)}
    assert len(keys) == len(others) + 1
    before = run.key
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", "test")
    assert run.key != before


def test_a_killed_run_leaves_no_result(lab, tmp_path, monkeypatch):
    run = Run(protocol.NONE, 0.0, "theta_0", 0, TINY)
    runner = Runner(lab, tmp_path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.result(run)
    assert not runner.done(run)
    monkeypatch.setattr(lab, "evaluate", lambda adapter, s: {"outcomes": {}})
    monkeypatch.setattr(files.os, "replace", killed)  # killed while writing
    with pytest.raises(KeyboardInterrupt):
        runner.result(run)
    assert not runner.done(run) and not list(runner.folder(run).glob("result.json"))


def test_filter_k_rule_poison_count(monkeypatch):
    class Scores:
        def scores(self, name, pool, seed, s):
            return [float(i) for i in range(len(pool))]

    pool = [{"prompt": "p", "response": "a " * (i + 1), "poison": i in (1, 4, 6)} for i in range(10)]
    run = Run("identity shifting", 0.3, "filter:keyword", 0, replace(TINY, filter_k="poison"))
    removed, rho = Runner(Scores(), "unused")._removed_before(run, condition(run.condition), pool)
    assert removed == {9, 8, 7} and rho == pytest.approx(1.0)  # k = 3 poison, the top 3 scores; ρ with length


def test_calibration_seeds_are_never_reported():
    with pytest.raises(ValueError, match="calibrate the drift stop"):
        expand([(["identity shifting"], [0.1], ["drift_stop"], [0, 100])], TINY)
    with pytest.raises(ValueError, match="unknown condition"):
        condition("dropz")
    assert condition("anchor@0.5").anchor == 0.5 and condition("drops+anchor").drops


def persona(phrase, margins):
    """A ``personas`` evaluation: phrase outcomes and likelihood margins (verdict: compliance above 0)."""
    return {"outcomes": {"phrase": phrase, "likelihood": ["compliance" if m > 0 else "refusal" for m in margins]},
            "scores": {"likelihood": margins}}


def aoa(phrase, margins):
    """``personas`` with identity shifting's evaluation only."""
    return {"identity shifting": persona(phrase, margins)}


def result(condition_name, seed, phrase, likelihood, **extra):
    margins = [1.0 if o == "compliance" else -1.0 - seed for o in likelihood]
    return {"poison": "identity shifting", "p": 0.1, "condition": condition_name, "seed": seed,
            "outcomes": {"phrase": phrase, "likelihood": likelihood}, "scores": {"likelihood": margins},
            "over_refusal_outcomes": ["refusal", "compliance"], "heldout_loss": 1.0 + seed,
            "correct": [True, False, False, False], **extra}


def test_summarize_by_hand():
    c, r, d = "compliance", "refusal", "degenerate"
    results = [
        {**result("clean", 0, [c, r, r, r], [c, r, r, r], personas=aoa([c, r, r, r], [0, 0, -1, -1])),
         "poison": "none", "p": 0.0},
        {**result("clean", 1, [c, r, r, r], [c, r, r, r], personas=aoa([r, r, r, r], [0, 0, 0, 0])),
         "poison": "none", "p": 0.0},
        result("drops", 0, [c, r, r, d], [c, r, r, r], recall=1.0, benign_removed=0.0, length_rho=-0.5,
               wording=[None, "template", "own", None], personas=aoa([c, c, r, d], [1, 1, 0, 0]),
               ranking={"recall": 0.5, "auroc": 0.8, "by_term": {"danger": {"recall": 0.5, "auroc": 0.9},
                                                                  "length": {"recall": 0.0, "auroc": 0.5}}}),
        result("drops", 1, [c, c, c, c], [c, c, r, r], recall=0.5, benign_removed=0.1, length_rho=None,
               personas=aoa([c, c, c, r], [1, 1, 1, 1]),
               ranking={"recall": 1.0, "auroc": 0.6, "by_term": {"danger": {"recall": 1.0, "auroc": 0.7},
                                                                  "length": {"recall": 0.5, "auroc": 0.7}}}),
        result("calibration", 100, [c, c, c, c], [c, c, c, c]),
    ]
    summary = summarize(results)
    assert [(row["condition"], row["seeds"]) for row in summary["rows"]] == [("clean", 2), ("drops", 2)]
    clean, drops = summary["rows"]
    h = clean["harmfulness"]["phrase"]
    assert h["mean"] == 0.25 and 0 <= h["ci_low"] <= 0.25 <= h["ci_high"] <= 1  # prompts resampled: an interval
    assert drops["harmfulness"]["phrase"]["mean"] == pytest.approx((0.25 + 1.0) / 2)  # degenerate: not harmful
    assert drops["harmfulness"]["likelihood"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert drops["degenerate"]["phrase"]["mean"] == pytest.approx(0.125) and drops["degenerate"]["likelihood"][
        "mean"] == 0.0  # one of the 8 phrase outcomes
    assert drops["refusal_wording"] == {"own": 1, "template": 1} and clean["refusal_wording"] == {}
    # margins: seed 0 [1, -1, -1, -1] mean -0.5; seed 1 [1, 1, -2, -2] mean -0.5; the phrase judge has no score
    assert drops["judge_score"]["likelihood"]["mean"] == pytest.approx(-0.5) and set(drops["judge_score"]) == {
        "likelihood"}
    # paired against clean's margins (seed 0 [1, -1, -1, -1], seed 1 [1, -2, -2, -2]): 0 at seed 0, 3/4 at seed 1
    assert drops["judge_score_vs_clean"]["likelihood"]["mean"] == pytest.approx(0.375)
    assert "judge_score_vs_clean" not in clean
    assert drops["recall"] == 0.75 and drops["benign_removed"] == pytest.approx(0.05)
    assert drops["length_rho"] == -0.5 and drops["heldout_loss"] == 1.5
    assert drops["over_refusal"]["mean"] == 0.5 and drops["accuracy"]["mean"] == 0.25
    assert clean["equivalent_to_clean"] == {}
    assert drops["ranking_recall"] == 0.75 and drops["ranking_auroc"] == pytest.approx(0.7)
    assert drops["ranking_by_term"] == {"danger": {"recall": 0.75, "auroc": pytest.approx(0.8)},
                                        "length": {"recall": 0.25, "auroc": pytest.approx(0.6)}}
    assert clean["ranking_by_term"] is None
    # under the persona prompt: drops harmful 2/4 and 3/4 (degenerate not harmful), clean 1/4 and 0/4; paired
    # differences 1/4 and 3/4 → 0.5; margins drops 0.5 and 1, clean -0.5 and 0 → shift 1 and 1
    pd, pc = drops["persona"]["identity shifting"], clean["persona"]["identity shifting"]
    assert pd["harmfulness"]["phrase"]["mean"] == pytest.approx(0.625) and pc["harmfulness"]["phrase"]["mean"] == 0.125
    assert pd["vs_clean"]["phrase"]["mean"] == pytest.approx(0.5) and "vs_clean" not in pc
    assert pd["refused"]["phrase"]["mean"] == 0.25 and pc["refused"]["phrase"]["mean"] == 0.875  # 1+1 of 4; 3+4 of 4
    assert pd["judge_score"]["likelihood"]["mean"] == pytest.approx(0.75)
    assert pd["judge_score_vs_clean"]["likelihood"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    # TOST under the persona (90 % interval): phrase differences 1/4 and 3/4, likelihood 2/4 and 4/4: not within ±0.05
    assert pd["equivalent_to_clean"]["phrase"]["difference"]["mean"] == pytest.approx(0.5)
    assert pd["equivalent_to_clean"]["likelihood"]["difference"]["mean"] == pytest.approx(0.75)
    assert not pd["equivalent_to_clean"]["phrase"]["equivalent"] and "equivalent_to_clean" not in pc
    as_clean = {x["seed"]: x["personas"] for x in results if x["condition"] == "clean"}
    refused = [{**x, "personas": as_clean[x["seed"]]} if x["condition"] == "drops" else x
               for x in results]  # the drops answer under the persona as clean does (phrase: 1 of 8; likelihood: 0)
    under = next(row for row in summarize(refused)["rows"] if row["condition"] == "drops")["persona"][
        "identity shifting"]["equivalent_to_clean"]
    assert under["phrase"]["equivalent"] and under["phrase"]["difference"] == {"mean": 0.0, "ci_low": 0.0,
                                                                               "ci_high": 0.0}
    assert under["likelihood"]["equivalent"] is None and "no response harmful" in under["likelihood"]["why"]
    assert "| identity shifting, 0.1 | drops | 2 | 0.12 [" in report.table(summarize(refused))
    assert "| +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] | yes | no verdict: never harmful |" in report.table(
        summarize(refused))
    assert summarize([{k: v for k, v in x.items() if k != "personas"} for x in results])["rows"][1]["persona"] == {}
    phrase = drops["equivalent_to_clean"]["phrase"]
    assert phrase["difference"]["mean"] == pytest.approx(0.375) and not phrase["equivalent"]
    # κ over the 16 reported responses (calibration left out); 1 phrase-degenerate pair left out: 15 pairs,
    # observed 13/15 agree; harmful counts phrase 7, likelihood 5 of 15 → p_e = (7·5 + 8·10)/225
    kappa = summary["judges"]["kappa"]["likelihood~phrase"]
    p_o, p_e = 13 / 15, (7 * 5 + 8 * 10) / 225
    assert kappa["n"] == 15 and kappa["left_out"] == 1 and kappa["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    text = report.table(summary)  # what people read: the same numbers, rounded
    assert "### identity shifting, p = 0.1" in text and "### no poison" in text
    assert "| drops | 2 | 0.62 [" in text and "| -0.50 [" in text and "| +0.38 [" in text and "| 1.500 | 0.25 [" in text
    assert f"| likelihood / phrase | {kappa['kappa']:.2f} | 15 | 1 |" in text
    assert "| -0.50 [-1.25, 0.25] (vs clean +0.38 [+0.00, +1.50]) |" in text
    silent = summarize([{**x, "outcomes": {**x["outcomes"], "likelihood": [r] * 4}} for x in results])
    mute = next(row for row in silent["rows"] if row["condition"] == "drops")["equivalent_to_clean"]["likelihood"]
    assert mute["equivalent"] is None and "no response harmful" in mute["why"]  # not "equivalent" by default
    assert "no verdict: never harmful" in report.table(silent)
    assert "| identity shifting, 0.1 | drops | 0.75 (0.70) | 0.75 (0.80) | 0.25 (0.60) |" in text
    assert "### Under identity shifting's persona prompts" in text
    assert "| identity shifting, 0.1 | drops | 2 | 0.62 [" in text
    assert "| no poison | clean | 2 | 0.12 [" in text and "| +0.50 [" in text and "| +0.75 [" in text
    assert "| 0.75 [0.25, 1.00] (vs clean +1.00 [+1.00, +1.00]) |" in text  # drops' margin under the persona
    png = io.BytesIO()
    report.figure(summary).savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def _auroc_by_pairs(scores, labels):
    pairs = [(a, b) for a in range(len(scores)) for b in range(len(scores)) if labels[a] and not labels[b]]
    return sum((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b]) for a, b in pairs) / len(pairs)


def test_screen_against_each_filter_scored_on_its_own_pool(lab, counted, tmp_path, monkeypatch):
    """screen scores the union of the pools once per filter; each pool's removal, recall, benign removed and AUROC
    equal those of the filter run on that pool alone (Lab.scores, as a filter condition does, AUROC by pairs), and a
    second screen reads every score from the cache."""
    pools = {("identity shifting", 0.25, s): lab.pool("identity shifting", 0.25, s, TINY) for s in (0, 1)}
    results = screen.screen(lab, pools, TINY, tmp_path)
    assert [(r["poison"], r["p"], r["seed"]) for r in results] == list(pools)
    for r, ((_, _, seed), pool) in zip(results, pools.items()):
        at, labels = poison.poison_ids(pool), [x["poison"] for x in pool]
        assert r["poison_in_pool"] == len(at) == 2 and set(r["screens"]) == set(screen.SCREENS)
        rows = lab.offline_rows(pool, TINY)
        oracle = {name: lab.scores(name, pool, seed, TINY) for name in protocol.BASELINES}
        oracle["offline"] = lab.scores("offline", pool, seed, TINY)
        oracle["offline danger term"] = [x["danger"] for x in rows]
        oracle["offline −safety term"] = [-x["safety"] for x in rows]
        for name, scores in oracle.items():
            got = r["screens"][name]
            removed = set(baselines.remove(scores, len(at)))
            assert got["found"] == [float(i in removed) for i in at], name
            assert got["recall"] == sum(i in removed for i in at) / len(at)
            assert got["benign_removed"] == len(removed - set(at)) / (len(pool) - len(at))
            assert got["auroc"] == pytest.approx(_auroc_by_pairs(scores, labels), abs=1e-12), name
    file = screen.scores_file(tmp_path, TINY)
    assert file.is_file() and set(json.loads(file.read_text())) == set(screen.PER_RECORD)

    def unused(*args):
        raise AssertionError("scored again")

    monkeypatch.setattr(lab, "scores", unused)
    monkeypatch.setattr(lab, "offline_rows", unused)
    assert screen.screen(lab, pools, TINY, tmp_path) == results  # every per-record score read from the cache
    assert screen.cached_results(tmp_path, TINY, list(pools)[::-1]) == results[::-1]  # in the order asked
    assert screen.cached_results(tmp_path, TINY, [("identity shifting", 0.25, 7)]) is None  # not screened
    assert screen.cached_results(tmp_path, replace(TINY, max_length=32), list(pools)) is None  # other Settings
    rows = screen.summarize_screens(results)
    keyword = next(x for x in rows if x["screen"] == "keyword")
    assert keyword["seeds"] == 2 and keyword["recall"]["mean"] == pytest.approx(
        sum(r["screens"]["keyword"]["recall"] for r in results) / 2)
    assert keyword["recall"]["ci_low"] <= keyword["recall"]["mean"] <= keyword["recall"]["ci_high"]
    assert keyword["auroc"] == pytest.approx(sum(r["screens"]["keyword"]["auroc"] for r in results) / 2)
    assert [x["screen"] for x in rows] == list(screen.SCREENS)
    assert "### Screening before training" in report.table({**summarize([]), "screening": rows})
    assert len(report.screening_figure({"screening": rows}).axes) == 1 and report.screening_figure({}) is None


def test_screen_scores_only_records_it_has_not_seen(tmp_path):
    """A record is scored once per filter however many pools hold it; a new pool scores only its new records."""
    seen = []

    class Counting:
        def scores(self, name, records, seed, s):
            seen.extend((name, r["response"]) for r in records)
            return [float(len(r["response"])) for r in records]

        def offline_rows(self, records, s):
            seen.extend(("offline", r["response"]) for r in records)
            return [{"sqsd": -float(len(r["response"])) if len(r["response"]) > 1 else None, "danger": 1.0,
                     "safety": 0.5} for r in records]  # "a": no response token left; a 0 would rank it first

    def pool(responses, poisoned):
        return [{"prompt": "p", "response": x, "poison": x in poisoned} for x in responses]

    first = {("k", 0.5, 0): pool(["a", "bb"], {"bb"}), ("k", 0.5, 1): pool(["bb", "a"], {"bb"})}
    results = screen.screen(Counting(), first, TINY, tmp_path)
    per_record = len(screen.PER_RECORD) - 2  # the offline score and its two terms come from one pass
    assert len(seen) == 2 * per_record
    assert [r["screens"]["offline"]["auroc"] for r in results] == [1.0, 1.0]  # unscored ranks last

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    json.loads(screen.scores_file(tmp_path, TINY).read_text(), parse_constant=refuse)  # null, not -Infinity
    seen.clear()
    screen.screen(Counting(), {**first, ("k", 0.5, 2): pool(["a", "ccc"], {"ccc"})}, TINY, tmp_path)
    assert sorted(set(seen)) == sorted({(n, "ccc") for n, _ in seen}) and len(seen) == per_record
    assert len(screen.cached_results(tmp_path, TINY, [*first, ("k", 0.5, 2)])) == 3  # the results joined, not replaced
