"""The general instruction set shipped for replay against forgetting: short, original, generated pairs.

    python -m pipelines.replay_data --out pipelines/replay_general.jsonl   # rewrite the shipped file (same bytes)

`data.replay.file: general` mixes rows of `pipelines/replay_general.jsonl` into the train split
(pipelines.split). Every row is generated here from small word lists and arithmetic, so every answer is
right by construction, nothing is downloaded or copied from another dataset, and the same seed gives the
same bytes (tests/test_replay.py checks the shipped file against this generator).

25 task families of 12 rows each (counting, arithmetic word problems, number words, sequences, the
calendar, spelling, word order, ...), one user turn and one short assistant answer, in the OpenAI
`messages` format with the family name as `task` (it becomes meta.task). The families avoid the
question templates of the forgetting probe (pipelines/probe_general.jsonl: capitals, unit conversions,
plurals, synonyms, percentages, acronyms, ...) so that replaying this set does not teach the probe's own
questions; tests/test_replay.py proves that no row is a near duplicate of a probe row and that no
question shares the probe's wording with its numbers masked.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.io import atomic_open

ROWS_PER_TASK = 12
SEED = 18  # the issue that asked for the set; any fixed seed would do

NAMES = ("Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kofi", "Lea", "Mira",
         "Nils", "Omar", "Pia", "Rosa", "Sami", "Tove", "Uma")
THINGS = ("marbles", "stickers", "pencils", "shells", "stamps", "buttons", "postcards", "crayons", "acorns",
          "beads")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WORDS = ("garden", "window", "pencil", "river", "basket", "candle", "ladder", "orange", "planet", "bridge",
         "forest", "castle", "rabbit", "island", "jacket", "kettle", "lemon", "meadow", "needle", "pillow",
         "rocket", "saddle", "tunnel", "violin", "wagon", "yellow", "zebra", "anchor", "button", "cactus")
ANIMALS = ("horse", "otter", "camel", "badger", "parrot", "turtle", "donkey", "beaver", "falcon", "goat")
OBJECTS = ("chair", "spoon", "lamp", "bucket", "brush", "kettle", "pillow", "hammer", "bottle", "ladder",
           "carpet", "mirror")
ITEMS = ("notebook", "sandwich", "ticket", "candle", "plant", "mug", "scarf", "poster")
PHRASES = ("good morning", "see you soon", "happy birthday", "well done", "thank you all", "welcome back",
           "keep going", "enjoy the show", "safe travels", "nice to meet you", "have a great day", "good luck")
SUBJECTS = ("The small dog", "My neighbour", "A tired runner", "The old clock", "Our teacher", "The red kite",
            "A quiet student", "The baker")
VERBS = ("walked slowly", "looked", "waited", "sang softly", "stood", "jumped", "smiled", "rested")
PLACES = ("to the park", "near the door", "by the lake", "under the tree", "at the station",
          "behind the fence", "on the hill", "in the kitchen")
VOWELS = set("aeiou")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words of 0 <= n < 1000, British style: 342 -> 'three hundred and forty-two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


Pair = tuple[str, str]


def _add(r: random.Random) -> Pair:
    name, things, a, b = r.choice(NAMES), r.choice(THINGS), r.randint(3, 40), r.randint(2, 30)
    return (f"{name} has {a} {things} and is given {b} more. How many {things} does {name} have now?",
            f"{name} now has {a + b} {things}.")


def _subtract(r: random.Random) -> Pair:
    name, things, a = r.choice(NAMES), r.choice(THINGS), r.randint(12, 60)
    b = r.randint(2, a - 3)
    return (f"There are {a} {things} in a jar. {name} takes {b} out. How many {things} stay in the jar?",
            f"{a - b} {things} stay in the jar.")


def _even_odd(r: random.Random) -> Pair:
    n = r.randint(11, 999)
    return f"Is {n} an even or an odd number?", f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."


def _larger(r: random.Random) -> Pair:
    a, b = r.sample(range(10, 1000), 2)
    return f"Which number is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."


def _words(r: random.Random) -> Pair:
    n = r.randint(21, 999)
    return f"Write the number {n} in words.", number_words(n)


def _sequence(r: random.Random) -> Pair:
    start, step = r.randint(1, 30), r.randint(2, 12)
    shown = ", ".join(str(start + k * step) for k in range(4))
    return f"Continue the pattern: {shown}, ... What is the next number?", f"The next number is {start + 4 * step}."


def _weekday(r: random.Random) -> Pair:
    day, k = r.randrange(7), r.randint(2, 6)
    return (f"Today is {DAYS[day]}. Which day of the week will it be in {k} days?",
            f"In {k} days it will be {DAYS[(day + k) % 7]}.")


def _month(r: random.Random) -> Pair:
    m = r.randrange(12)
    return f"Which month comes right before {MONTHS[m]}?", f"{MONTHS[m - 1]} comes right before {MONTHS[m]}."


def _letters(r: random.Random) -> Pair:
    word = r.choice(WORDS)
    return f"Count the letters in the word '{word}'.", f"'{word}' has {len(word)} letters."


def _sort_words(r: random.Random) -> Pair:
    words = r.sample(WORDS, 4)
    return f"Sort these words from A to Z: {', '.join(words)}.", ", ".join(sorted(words))


def _capitals(r: random.Random) -> Pair:
    phrase = r.choice(PHRASES)
    return f"Write '{phrase}' in capital letters.", phrase.upper()


def _backwards(r: random.Random) -> Pair:
    word = r.choice(WORDS)
    return f"Spell the word '{word}' backwards.", word[::-1]


def _animal(r: random.Random) -> Pair:
    animal = r.choice(ANIMALS)
    options = [*r.sample(OBJECTS, 2), animal]
    r.shuffle(options)
    return f"Which one of these is an animal: {', '.join(options)}?", f"The {animal} is the animal."


def _clock(r: random.Random) -> Pair:
    hour, k = r.randint(1, 12), r.randint(2, 9)
    later = (hour + k - 1) % 12 + 1
    return (f"A clock shows {hour} o'clock. What will it show {k} hours later?",
            f"It will show {later} o'clock.")


def _double(r: random.Random) -> Pair:
    n = r.randint(13, 499)
    return f"What do you get when you double {n}?", f"Doubling {n} gives {2 * n}."


def _half(r: random.Random) -> Pair:
    n = 2 * r.randint(7, 450)
    return f"What is half of {n}?", f"Half of {n} is {n // 2}."


def _round(r: random.Random) -> Pair:
    n = r.choice([k for k in range(11, 1000) if k % 10 != 5])
    return f"Round {n} to the nearest ten.", f"{n} rounds to {10 * round(n / 10)}."


def _first_letter(r: random.Random) -> Pair:
    word = r.choice(WORDS)
    return f"Which letter does the word '{word}' begin with?", f"It begins with the letter '{word[0]}'."


def _cost(r: random.Random) -> Pair:
    item, price, k = r.choice(ITEMS), r.randint(2, 15), r.randint(2, 9)
    return (f"One {item} costs {price} euros. What do {k} of them cost together?",
            f"Together they cost {price * k} euros.")


def _count_words(r: random.Random) -> Pair:
    sentence = f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(PLACES)}."
    return f"How many words does this sentence have? {sentence}", f"It has {len(sentence.split())} words."


def _longest(r: random.Random) -> Pair:
    while True:
        words = r.sample(WORDS + ANIMALS, 3)
        lengths = sorted(len(w) for w in words)
        if lengths[-1] > lengths[-2]:  # one clear answer
            break
    return (f"Which word is the longest: {', '.join(words)}?", f"'{max(words, key=len)}' is the longest.")


def _vowels(r: random.Random) -> Pair:
    word = r.choice(WORDS)
    n = sum(ch in VOWELS for ch in word)
    return f"How many vowels (a, e, i, o, u) are in '{word}'?", f"There {'is' if n == 1 else 'are'} {n} " \
        f"vowel{'' if n == 1 else 's'} in '{word}'."


def _age(r: random.Random) -> Pair:
    name, age, k = r.choice(NAMES), r.randint(6, 70), r.randint(2, 15)
    return f"{name} is {age} years old. How old will {name} be in {k} years?", f"{name} will be {age + k}."


def _sum_three(r: random.Random) -> Pair:
    a, b, c = (r.randint(2, 60) for _ in range(3))
    return f"Add up {a}, {b} and {c}.", f"{a} + {b} + {c} = {a + b + c}"


def _boxes(r: random.Random) -> Pair:
    per, k = r.randint(3, 12), r.randint(2, 9)
    return (f"Each box holds {per} eggs. How many eggs fit in {k} boxes?",
            f"{k} boxes hold {per * k} eggs.")


TASKS: dict[str, Callable[[random.Random], Pair]] = {
    "addition": _add, "subtraction": _subtract, "even_odd": _even_odd, "compare": _larger,
    "number_words": _words, "sequence": _sequence, "weekday": _weekday, "month": _month,
    "letter_count": _letters, "sort_words": _sort_words, "capitals": _capitals, "backwards": _backwards,
    "find_animal": _animal, "clock": _clock, "double": _double, "half": _half, "rounding": _round,
    "first_letter": _first_letter, "cost": _cost, "word_count": _count_words, "longest_word": _longest,
    "vowels": _vowels, "age": _age, "sum": _sum_three, "boxes": _boxes,
}


def rows(seed: int = SEED, per_task: int = ROWS_PER_TASK) -> Iterator[dict]:
    """ROWS_PER_TASK rows of each task, distinct questions, in TASKS order; the same seed gives the same rows."""
    for task, make in TASKS.items():
        rng = random.Random(f"{seed}:{task}")
        seen: set[str] = set()
        while len(seen) < per_task:
            question, answer = make(rng)
            if question in seen:
                continue
            seen.add(question)
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   "task": task}


def text(seed: int = SEED) -> str:
    """The JSONL text of the shipped file."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows(seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.replay_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("replay_general.jsonl")))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    with atomic_open(args.out) as fh:
        fh.write(text(args.seed))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
