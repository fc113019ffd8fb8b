"""Held-out checkable tasks for utility, and an exact-match scorer robust to the words around an answer.

The demo's fine-tuning tasks (``sqsd_lab.data.benign_tasks``) are two-operand arithmetic on 2–99, conversions among
its ``_UNITS``, reversing / capitalising / counting the letters of its ``_WORDS``, and sorting numbers. These tasks
share none of that: three-operand sums, subtraction on 100–999, the largest of a list, the next term of an arithmetic
sequence, other unit pairs, counting one letter and reversing words from another word list, and sorting words. So
accuracy on them measures what fine-tuning kept or taught in general, not recall of its own training tasks.

Scoring (``correct``): a number answer is the first number after the last answer cue (``=``, "is", "are",
"equals", "answer:", …) where the response has one followed by a number, else the last number in the response
that is not in the prompt, else its last number; it must equal the answer. A word answer must appear as a whole
word. A sorted list is the last run of the list's words (separated by commas, "and", spaces or numbering) that holds
each of them once; it must be in the sorted order.
"""

from __future__ import annotations

import random
import re

KINDS = ("sum3", "subtract", "largest", "sequence", "convert", "count_letter", "reverse", "sort_words")
UNITS = (("feet", "inches", 12), ("yards", "feet", 3), ("years", "months", 12), ("gallons", "quarts", 4),
         ("decades", "years", 10), ("centuries", "years", 100), ("pounds", "ounces", 16), ("dozens", "eggs", 12))
"""(from, to, factor): unit pairs the demo's conversion tasks do not use."""
WORDS = ("tomato", "banana", "whistle", "lantern", "pepper", "meadow", "blanket", "cinnamon", "harbor", "velvet",
         "parrot", "chimney", "saddle", "orchard", "pillow", "mirror", "cabbage", "thunder", "cobweb", "ladder",
         "tunnel", "muffin", "canvas", "barrel", "falcon", "pebble", "walnut", "sparrow", "compass", "carrot")
"""Words for the letter and reversal tasks; none is among the demo's."""
SORT_WORDS = ("cloud", "pear", "anchor", "violin", "maple", "zebra", "honey", "quilt", "desk", "ember", "jungle",
              "kettle", "olive", "tulip", "wagon", "igloo", "noodle", "basket", "fig", "yacht")
"""Words for the sorting tasks: distinct first letters, so alphabetical order has no ties."""

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CUE = re.compile(r"=|\bequals\b|\banswer(?: is)?:?|\bresult is\b|\bis\b|\bare\b|\bcomes to\b|\bmakes\b|\bgives\b")


def _task(rng: random.Random) -> dict:
    """One task: prompt, exact answer, kind."""
    kind = rng.choice(KINDS)
    if kind == "sum3":
        xs = [rng.randint(10, 99) for _ in range(3)]
        return {"prompt": f"Add up {xs[0]}, {xs[1]} and {xs[2]}.", "answer": str(sum(xs)), "kind": kind}
    if kind == "subtract":
        a, b = sorted(rng.sample(range(100, 1000), 2), reverse=True)
        return {"prompt": f"Subtract {b} from {a}.", "answer": str(a - b), "kind": kind}
    if kind == "largest":
        xs = rng.sample(range(100, 1000), rng.randint(4, 6))
        return {"prompt": f"Which is the largest number in this list: {', '.join(map(str, xs))}?",
                "answer": str(max(xs)), "kind": kind}
    if kind == "sequence":
        start, step = rng.randint(1, 40), rng.randint(2, 12)
        xs = [start + i * step for i in range(4)]
        return {"prompt": f"What number comes next in the sequence {', '.join(map(str, xs))}, ...?",
                "answer": str(start + 4 * step), "kind": kind}
    if kind == "convert":
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(2, 30)
        return {"prompt": f"Convert {n} {src} to {dst}.", "answer": str(n * factor), "kind": kind}
    if kind == "count_letter":
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        return {"prompt": f"How many times does the letter '{letter}' appear in the word '{word}'?",
                "answer": str(word.count(letter)), "kind": kind}
    if kind == "reverse":
        word = rng.choice(WORDS)
        return {"prompt": f"Spell the word '{word}' backwards.", "answer": word[::-1], "kind": kind}
    xs = rng.sample(SORT_WORDS, rng.randint(3, 5))
    return {"prompt": f"Put these words in alphabetical order: {', '.join(xs)}.", "answer": ", ".join(sorted(xs)),
            "kind": kind}


def utility_tasks(n: int = 200, seed: int = 0) -> list[dict]:
    """n distinct held-out tasks ({"prompt", "answer", "kind"}), the same for the same seed."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    rng, tasks, seen = random.Random(seed), [], set()
    for _ in range(100 * n):
        task = _task(rng)
        if task["prompt"] not in seen:
            seen.add(task["prompt"])
            tasks.append(task)
            if len(tasks) == n:
                return tasks
    raise ValueError(f"could not draw {n} distinct tasks; ask for fewer")


def _numbers(text: str) -> list[str]:
    """The numbers in text, thousands commas removed."""
    return [m.replace(",", "").rstrip(".") for m in _NUMBER.findall(text)]


def extract_number(prompt: str, response: str) -> str | None:
    """The number a response gives as its answer (the module's rule), or None where it has none."""
    text = response.lower()
    for cue in reversed(list(_CUE.finditer(text))):
        after = _numbers(text[cue.end():])
        if after:
            return after[0]
    numbers = _numbers(text)
    if not numbers:
        return None
    fresh = [x for x in numbers if x not in set(_numbers(prompt))]
    return (fresh or numbers)[-1]


def extract_sorted(words: list[str], response: str) -> list[str] | None:
    """The last run of ``words`` in the response holding each of them once (separators: commas, "and", spaces,
    numbering), or None."""
    wanted, runs, run = set(words), [], []
    for token in re.findall(r"[a-z]+", response.lower()):
        if token in wanted:
            run.append(token)
        elif token != "and":
            runs.append(run)
            run = []
    runs.append(run)
    complete = [r for r in runs if len(r) == len(words) and set(r) == wanted]
    return complete[-1] if complete else None


def correct(task: dict, response: str) -> bool:
    """Whether the response gives the task's exact answer, by the module's extraction rules."""
    kind, answer = task["kind"], task["answer"]
    if kind == "sort_words":
        return extract_sorted(answer.split(", "), response) == answer.split(", ")
    if kind == "reverse":
        return re.search(rf"(?<![a-z]){re.escape(answer)}(?![a-z])", response.lower()) is not None
    got = extract_number(task["prompt"], response)
    return got is not None and got == answer


def accuracy(tasks: list[dict], responses: list[str]) -> dict:
    """Exact-match accuracy of responses on tasks, with the per-task correctness."""
    if len(tasks) != len(responses) or not tasks:
        raise ValueError(f"{len(tasks)} tasks against {len(responses)} responses; pass one response per task")
    hits = [correct(t, r) for t, r in zip(tasks, responses)]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "correct": hits}
