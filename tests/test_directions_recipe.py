"""`sqsd directions --recipe paper` offline: the three Hub datasets come from a `datasets` cache this test builds the
way `load_dataset` leaves it after a first online load, and the real `load_dataset("PKU-Alignment/BeaverTails", ...)`
reads it under HF_HUB_OFFLINE. Each adapter must train on the rows the recipe's filters keep (unsafe BeaverTails and
Aegis responses, PKU-SafeRLHF's safer response where it is safe), with the fine-tune's rank and modules."""

import json
import shutil

import pytest
from peft import LoraConfig

from sqsd_callback import DirectionSet
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.cli import main
from sqsd_lab.data import CHATML_TEMPLATE
from sqsd_lab.paper_recipe import SOURCES, adapter_folders, fine_tune_lora, load_source, sample
from sqsd_lab.tiny import tiny_base, word_tokenizer

# word-level texts over the tiny vocabulary (w3 … w95)
BEAVER = [{"prompt": f"w1{i} w40 w41", "response": f"w50 w51 w6{i}", "is_safe": i % 2 == 0,
           "category": {"violence": i % 2 == 1}} for i in range(6)]
BEAVER.append({"prompt": "w19 w40", "response": "", "is_safe": False, "category": {"violence": True}})  # empty
BEAVER_KEPT = [1, 3]  # 5 is unsafe too, but its prompt is held out
AEGIS = [
    {"prompt": "w20 w42", "response": "w52 w70", "response_label": "unsafe"},
    {"prompt": "w21 w42", "response": "w52 w71", "response_label": "safe"},
    {"prompt": "REDACTED", "response": "w52 w72", "response_label": "unsafe"},
    {"prompt": "w23 w42", "response": None, "response_label": None},  # a prompt-only row
    {"prompt": "w24 w42", "response": "w52 w74", "response_label": "unsafe"},
]
for i, row in enumerate(AEGIS):
    row.update(id=f"a{i}", prompt_label="unsafe", violated_categories="Violence", reconstruction_id_if_redacted=None,
               prompt_label_source="human", response_label_source="llm_jury")
AEGIS_KEPT = [0, 4]
PKU = [
    {"prompt": "w30 w43", "response_0": "w53 w80", "response_1": "w54 w81", "safer_response_id": 0,
     "is_response_0_safe": True, "is_response_1_safe": False},
    {"prompt": "w31 w43", "response_0": "w53 w82", "response_1": "w54 w83", "safer_response_id": 1,
     "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "w32 w43", "response_0": "w53 w84", "response_1": "w54 w85", "safer_response_id": 0,
     "is_response_0_safe": False, "is_response_1_safe": False},  # the safer one is still unsafe
    {"prompt": "w33 w43", "response_0": "w53 w86", "response_1": "w54 w87", "safer_response_id": 1,
     "is_response_0_safe": True, "is_response_1_safe": True},
]
for row in PKU:
    row.update(better_response_id=1 - row["safer_response_id"], prompt_source="test")
PKU_KEPT = {0: "w53 w80", 1: "w54 w83", 3: "w54 w87"}


def _cache_dataset(cache, repo: str, splits: dict[str, list[dict]]) -> None:
    """``repo`` in the `datasets` cache as a first online ``load_dataset(repo)`` leaves it
    (``<org>___<snake name>/default/0.0.0/<hash>/``, Arrow files and dataset_info.json), built by the JSON builder
    from local files; offline, ``load_dataset(repo, split=...)`` finds it there."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    org, name = repo.split("/")
    name = camelcase_to_snakecase(name)
    work = cache / "_build"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.jsonl")
        (work / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Json(cache_dir=str(work), dataset_name=name, config_name="default", config_id="default", data_files=files,
         hash="0" * 16).download_and_prepare()
    shutil.move(str(work / name), str(cache / f"{org}___{name}"))
    shutil.rmtree(work)


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """The three datasets in a fresh datasets cache under a tmp HF_HOME, read offline."""
    import datasets

    cache = tmp_path / "hf" / "datasets"
    _cache_dataset(cache, "PKU-Alignment/BeaverTails", {"30k_train": BEAVER, "30k_test": BEAVER[:2]})
    _cache_dataset(cache, "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", {"train": AEGIS, "test": AEGIS[:1]})
    _cache_dataset(cache, "PKU-Alignment/PKU-SafeRLHF", {"train": PKU, "test": PKU[:1]})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))  # read when datasets was imported
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A tiny random Llama over a 96-word vocabulary with a ChatML template, saved as `--model` reads it."""
    path = tmp_path_factory.mktemp("word_model")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    tiny_base("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(folder) -> list[int]:
    return [r["row"] for r in read_jsonl(folder / "train.jsonl")]


def test_load_source_keeps_the_rows_each_filter_names(hub_datasets):
    records, about = load_source(SOURCES["beavertails"], exclude={BEAVER[5]["prompt"]})
    assert [r["row"] for r in records] == BEAVER_KEPT and all(not BEAVER[r["row"]]["is_safe"] for r in records)
    assert (about["rows"], about["matching"], about["held_out_prompts_removed"]) == (7, 3, 1)
    records, _ = load_source(SOURCES["aegis"])
    assert [(r["row"], r["response"]) for r in records] == [(i, AEGIS[i]["response"]) for i in AEGIS_KEPT]
    records, _ = load_source(SOURCES["pku-saferlhf"])
    assert {r["row"]: r["response"] for r in records} == PKU_KEPT
    chosen, skipped = sample(records, 2, seed=0, key="pku", fits=lambda r: r["row"] != 1)
    assert len(chosen) == 2 and 1 not in [r["row"] for r in chosen] and skipped <= 1
    assert [r["row"] for r in chosen] == sorted(r["row"] for r in chosen)  # dataset order


def test_data_override_reads_a_local_file_and_wrong_fields_are_named(tmp_path, monkeypatch):
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PKU))
    records, about = load_source(SOURCES["pku-saferlhf"], str(path))
    assert {r["row"]: r["response"] for r in records} == PKU_KEPT and about["loaded_from"] == str(path)
    wrong = tmp_path / "aegis1.jsonl"  # Aegis 1.0's layout: one text field, annotator labels
    wrong.write_text(json.dumps({"id": "x", "text": "w3", "text_type": "llm_response", "labels_0": "Safe"}) + "\n")
    with pytest.raises(ValueError, match=r"no field\(s\) \['prompt', 'response', 'response_label'\]"):
        load_source(SOURCES["aegis"], str(wrong))
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="load it once online.*--data beavertails=LOCAL_FILE_OR_FOLDER"):
        load_source(SOURCES["beavertails"])  # offline, and not in the cache


def test_lora_settings_from_flags_or_an_adapter_config(tmp_path):
    config, about = fine_tune_lora(4, "q_proj, v_proj")
    assert (config.r, sorted(config.target_modules), about["from"]) == (4, ["q_proj", "v_proj"], "flags")
    config, about = fine_tune_lora()
    assert (config.r, config.target_modules, about["from"]) == (8, "all-linear", "package default")
    LoraConfig(r=3, lora_alpha=12, target_modules=["k_proj", "down_proj"], use_dora=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DoRA"):
        fine_tune_lora(lora_config=str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        fine_tune_lora(rank=4, lora_config=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fine_tune_lora(lora_config=str(tmp_path / "nothing"))
    assert adapter_folders(["beavertails", "aegis"]) == {"danger": "beavertails", "danger-aegis": "aegis",
                                                          "safety": "pku-saferlhf"}
    with pytest.raises(ValueError, match="choose from beavertails, aegis"):
        adapter_folders(["beaver"])


@pytest.mark.slow
def test_paper_recipe_trains_each_adapter_on_its_filtered_rows_with_the_requested_lora(
        tmp_path, hub_datasets, word_model, capsys):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text(json.dumps({"prompt": BEAVER[5]["prompt"]}) + "\n")  # held out: never trained on
    out = tmp_path / "dirs"
    assert main(["directions", "--recipe", "paper", "--model", str(word_model), "--out", str(out),
                 "--aegis", "--n", "50", "--epochs", "1", "--max-length", "64",
                 "--rank", "2", "--target-modules", "q_proj,v_proj", "--batch-size", "1", "--harmful", str(harmful),
                 "--held-out", "1.0", "--gradient-checkpointing"]) == 0
    printed = capsys.readouterr()
    assert "tokens/s over 1 step(s); about" in printed.out and "gave 2 of the 50 examples asked" in printed.err
    assert "gradient checkpointing" in printed.out  # the large-model setting trains too (on by default on a GPU)
    for folder in ("danger", "danger-aegis", "safety"):
        config = json.loads((out / folder / "adapter_config.json").read_text())
        assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
        ds = DirectionSet.from_peft_adapter(out / folder, kind="safety" if folder == "safety" else "danger")
        assert sorted(ds.modules) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert _rows(out / "danger") == BEAVER_KEPT and _rows(out / "danger-aegis") == AEGIS_KEPT
    safety = read_jsonl(out / "safety" / "train.jsonl")
    assert {r["row"]: r["response"] for r in safety} == PKU_KEPT and {r["source"] for r in safety} == {"pku-saferlhf"}
    assert [r["prompt"] for r in read_jsonl(out / "held_out.jsonl")] == [BEAVER[5]["prompt"]]

    summary = json.loads((out / "directions.json").read_text())
    assert summary["recipe"] == "paper" and list(summary["adapters"]) == ["danger", "danger-aegis", "safety"]
    beaver, aegis, pku = (summary["sources"][f] for f in ("danger", "danger-aegis", "safety"))
    assert (beaver["dataset"], beaver["split"], beaver["kind"]) == ("PKU-Alignment/BeaverTails", "30k_train", "danger")
    assert "is_safe == False" in beaver["filter"] and "response_label == 'unsafe'" in aegis["filter"]
    assert (beaver["rows"], beaver["matching"], beaver["held_out_prompts_removed"], beaver["used"]) == (7, 3, 1, 2)
    assert (aegis["dataset"], aegis["used"], pku["used"], pku["paper_examples"]) == (
        "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", 2, 3, 10000)
    assert summary["lora"]["rank"] == 2 and summary["lora"]["targets"] == ["q_proj", "v_proj"]
    assert summary["settings"]["examples/safety"]["origin"] == "user (--n)"
    assert summary["settings"]["safety_objective"]["value"] == "sft"
    assert summary["time_estimate"]["measured_steps"] == 1
    assert [summary["adapters"][f]["steps"] for f in summary["adapters"]] == [2, 2, 3]


@pytest.mark.slow
def test_paper_recipe_takes_rank_and_modules_from_the_fine_tunes_adapter_config(tmp_path, hub_datasets,
                                                                                 word_model, capsys):
    lora = tmp_path / "my_lora"
    LoraConfig(r=3, lora_alpha=12, target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM").save_pretrained(lora)
    out = tmp_path / "dirs"
    argv = ["directions", "--recipe", "paper", "--model", str(word_model), "--out", str(out), "--danger-sources",
            "aegis", "--n", "1", "--epochs", "1", "--max-length", "64", "--lora-config", str(lora)]
    assert main(argv + ["--rank", "4"]) == 1 and "not both" in capsys.readouterr().err
    assert main(argv) == 0
    for folder in ("danger", "safety"):
        config = json.loads((out / folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (3, 12, ["down_proj", "k_proj"])
    summary = json.loads((out / "directions.json").read_text())
    assert summary["sources"]["danger"]["source"] == "aegis" and summary["lora"]["from"].endswith("adapter_config.json")
    assert summary["settings"]["lora"]["origin"] == str(lora / "adapter_config.json")
    assert len(read_jsonl(out / "danger" / "train.jsonl")) == len(read_jsonl(out / "safety" / "train.jsonl")) == 1
