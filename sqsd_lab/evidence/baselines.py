"""The data filters users would otherwise pick, as risk scores (higher = remove first), and how a removal is judged.

Each filter maps prompt/response records to one score per record: ``keyword_scores`` (affirmative openers and
harmful-topic words), ``moderation_scores`` (categories a keyword classifier finds in the prompt), He et al. 2024's
gradient and representation similarity to harmful anchors (``poison.gradient_similarity``,
``poison.representation_similarity``), ``activation_projection`` (DataShield-style, onto a compliance direction) and
``random_scores``. ``remove`` takes the top k; ``recall_and_benign_removed`` and ``length_correlation`` judge it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import numpy as np

from sqsd_lab.evidence import stats
from sqsd_lab.evidence.poison import gradient_similarity, mean_activations, representation_similarity, top_k

OPENER = re.compile(r"^\W*(?:sure|here is|here's|here are|absolutely|of course|certainly)\b", re.IGNORECASE)
"""Affirmative openers at the start of a response."""
HARM_CATEGORIES: dict[str, tuple[str, ...]] = {
    "violence": (r"kill", r"murder", r"assault", r"attack", r"stab(?:s|bed|bing)?\b", r"shoot", r"tortur",
                 r"kidnap", r"massacre", r"behead", r"genocid", r"terroris", r"hostage", r"casualt"),
    "weapons": (r"bombs?\b", r"bomb(?:ing|er)", r"explosive", r"firearm", r"guns?\b", r"gunman", r"ammunition",
                r"detonat", r"grenade", r"napalm", r"nerve agent", r"bioweapon", r"chemical weapon", r"sarin\b",
                r"ricin\b", r"anthrax"),
    "drugs": (r"cocaine", r"heroin\b", r"meth\b", r"methamphetamine", r"fentanyl", r"narcotic", r"opioid", r"lsd\b",
              r"overdos", r"drug dealer", r"illegal drugs?\b"),
    "hacking": (r"hack", r"malware", r"ransomware", r"keylogger", r"phishing", r"exploit", r"botnet", r"ddos",
                r"backdoor", r"sql injection", r"password crack", r"spyware", r"computer virus"),
    "self-harm": (r"suicid", r"self-harm", r"self harm", r"cut myself", r"kill myself", r"anorexi", r"bulimi",
                  r"starve yourself"),
    "hate": (r"racis", r"slurs?\b", r"nazi", r"holocaust", r"supremac", r"inferior race", r"ethnic cleansing",
             r"xenophob", r"antisemit", r"homophob"),
    "sexual": (r"porn", r"explicit sex", r"sexual", r"nudes?\b", r"orgy\b", r"orgies", r"erotic", r"prostitut",
               r"child abuse"),
    "fraud": (r"fraud", r"scam", r"counterfeit", r"launder", r"embezzl", r"forg(?:e|ed|ery|eries|ing)\b",
              r"identity theft", r"tax evasion", r"brib", r"insider trading", r"ponzi", r"extort", r"blackmail"),
}
"""Harmful-topic patterns by category (regular expressions matched at a word start, case-insensitive; most are stems),
written for this package: the categories follow the hazard taxonomies of moderation endpoints and guard models
(OpenAI moderation, Llama Guard's S1–S14), the words are ours. Deliberately crude: the filter a user would write in
an afternoon."""
_CATEGORY_RE = {c: re.compile(r"\b(?:" + "|".join(ws) + ")", re.IGNORECASE) for c, ws in HARM_CATEGORIES.items()}
_TOPIC_RE = re.compile(r"\b(?:" + "|".join(w for ws in HARM_CATEGORIES.values() for w in ws) + ")", re.IGNORECASE)

Scorer = Callable[[Sequence[dict]], list[float]]


def topic_words(text: str) -> list[str]:
    """The harmful-topic stems ``text`` holds (each as written in the text, lower case)."""
    return [m.lower() for m in _TOPIC_RE.findall(text)]


def categories(text: str) -> list[str]:
    """The harm categories whose stems ``text`` holds."""
    return [c for c, pattern in _CATEGORY_RE.items() if pattern.search(text)]


def keyword_scores(records: Sequence[dict]) -> list[float]:
    """Keyword filter: 1 for an affirmative opener at the response start plus one per harmful-topic word in the
    prompt and response."""
    return [float(bool(OPENER.match(r["response"]))) + len(topic_words(f"{r['prompt']}\n{r['response']}"))
            for r in records]


def moderation_scores(records: Sequence[dict]) -> list[float]:
    """Prompt-moderation-style filter: the number of harm categories the prompt alone hits."""
    return [float(len(categories(r["prompt"]))) for r in records]


def activation_projection(model, tokenizer, records: Sequence[dict], compliance: Sequence[dict],
                          refusals: Sequence[dict], max_length: int = 256) -> list[float]:
    """DataShield-style: each record's mean final-layer activation projected on the unit compliance direction (mean
    activation on harmful compliance minus mean on refusals)."""
    direction = (mean_activations(model, tokenizer, compliance, max_length).mean(0)
                 - mean_activations(model, tokenizer, refusals, max_length).mean(0))
    norm = direction.norm()
    if norm == 0:
        raise ValueError("the compliance and refusal anchors have the same mean activation; pass different anchors")
    return (mean_activations(model, tokenizer, records, max_length) @ (direction / norm)).tolist()


def random_scores(records: Sequence[dict], seed: int = 0) -> list[float]:
    """Random removal: a seeded random score per record (its top k is a uniform random k-subset)."""
    rng = random.Random(seed)
    return [rng.random() for _ in records]


def filters(model, tokenizer, compliance: Sequence[dict], refusals: Sequence[dict], seed: int = 0,
            max_length: int = 256) -> dict[str, Scorer]:
    """Every baseline as a ``records -> scores`` function, the model-based ones bound to ``model`` and the harmful
    ``compliance`` anchors (and ``refusals`` for the compliance direction)."""
    return {
        "keyword": keyword_scores,
        "moderation": moderation_scores,
        "gradient similarity": lambda rs: gradient_similarity(model, tokenizer, rs, compliance, max_length),
        "representation similarity": lambda rs: representation_similarity(model, tokenizer, rs, compliance,
                                                                          max_length),
        "activation projection": lambda rs: activation_projection(model, tokenizer, rs, compliance, refusals,
                                                                  max_length),
        "random": lambda rs: random_scores(rs, seed),
    }


def remove(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` highest-scoring records, the ones a filter removes (ties: the lower index first)."""
    return top_k(scores, k)


def recall_and_benign_removed(removed_ids: Sequence[int], poison_ids: Sequence[int], n: int) -> dict[str, float | None]:
    """``recall``: the share of poison removed; ``benign_removed``: the share of the n − |poison| benign records
    removed (None where there is no poison, or no benign record)."""
    removed, poison = set(removed_ids), set(poison_ids)
    if not removed | poison <= set(range(n)):
        raise ValueError(f"ids must be positions in a pool of {n}; got {sorted((removed | poison) - set(range(n)))}")
    benign = n - len(poison)
    return {"recall": len(removed & poison) / len(poison) if poison else None,
            "benign_removed": len(removed - poison) / benign if benign else None}


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """The chance that a random positive (poison) record scores above a random negative one, ties counting half
    (Mann–Whitney U on average ranks): how well a ranking separates at every threshold, not at one budget; None
    without both kinds."""
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels; pass one label per score")
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return None
    return float((stats.average_ranks(scores)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ranking_measures(scores: Sequence[float], ids: Sequence[int], poison_ids: Sequence[int],
                     n: int) -> tuple[list[int], dict]:
    """A ranking of the records at pool positions ``ids`` (of a pool of ``n``) by ``scores``, read as a filter at the
    filters' budget (k = the pool's poison count): its top k's positions, their recall and benign removed, and the
    ranking's AUROC over every threshold."""
    top = [ids[j] for j in remove(scores, len(poison_ids))]
    poison = set(poison_ids)
    return top, {**recall_and_benign_removed(top, poison_ids, n), "auroc": auroc(scores, [i in poison for i in ids])}


def response_words(record: dict) -> int:
    """A record's response length in words: what every ranking's ρ with length and the length thirds use."""
    return len(record["response"].split())


def length_correlation(scores: Sequence[float], lengths: Sequence[float]) -> float | None:
    """Spearman's ρ between a ranking's scores and the responses' lengths (Pearson on average ranks); None where
    either is constant."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths; pass one length per score")
    return stats.spearman(scores, lengths)


__all__ = ["HARM_CATEGORIES", "OPENER", "activation_projection", "auroc", "categories", "filters",
           "gradient_similarity", "keyword_scores", "length_correlation", "moderation_scores",
           "ranking_measures", "recall_and_benign_removed", "remove", "random_scores", "representation_similarity",
           "response_words", "topic_words"]
