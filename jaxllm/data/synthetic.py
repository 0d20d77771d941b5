"""A built-in, seeded, download-free corpus: arithmetic word problems in MathQA's format.

Each record has MathQA's seven string fields (Problem, Rationale, options, correct, annotated_formula,
linear_formula, category), written the way MathQA writes them: lower-case, space-tokenized text
("rs . 360", "km / hr"), options as "a ) 30 , b ) 40 , c ) 45 , d ) 36 , e ) none of these", the correct
letter at a random position, and every answer exact. Records are pure data so the MathQA stage can reuse
them; `format_document` turns one into pretraining text.

Record i depends only on (seed, i, held_out): `generate_problems(n, seed)` is a prefix of
`generate_problems(m, seed)` for n <= m.

Held-out problems. Each template has a small space of problem texts (9 dice sums, 38 squares), so two
seeds share many problems: a 20000-document pretraining corpus would hold most evaluation questions
verbatim. Instead every problem text is on one side of a fixed line: `is_held_out(text)` (a stable hash,
one text in HELD_OUT_EVERY) marks the texts that only evaluation splits may use. Training corpora draw
with `held_out=False` and evaluation splits with `held_out=True`, so no evaluation problem appears in any
training text, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# Bump when the generated text changes, so prepared token caches built from older records are not reused.
VERSION = 2  # 2: held-out problem texts (is_held_out) left out of training corpora
HELD_OUT_EVERY = 8  # one problem text in 8 is reserved for evaluation (every template keeps some: dice 3 of 9)
_HELD_OUT_SALT = b"jaxllm synthetic held-out v1"
MAX_DRAWS = 1000  # draws of one record before giving up (a 1-in-8 side is found in ~8 on average)
LETTERS = "abcde"
CATEGORIES = ("general", "physics", "gain", "geometry", "other", "probability")


def _num(x) -> str:
    """MathQA-style number text: integers without a decimal point, others with at most 2 decimals."""
    if isinstance(x, str):
        return x
    if float(x) == int(x):
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _frac(numerator: int, denominator: int) -> str:
    """A reduced fraction written MathQA's way: "3 / 8" (or "1" when it is whole)."""
    g = math.gcd(numerator, denominator)
    numerator, denominator = numerator // g, denominator // g
    return str(numerator) if denominator == 1 else f"{numerator} / {denominator}"


def _equals_reduced(numerator: int, denominator: int) -> str:
    """ "6 / 36 = 1 / 6", or just "5 / 9" when the fraction is already in lowest terms."""
    reduced = _frac(numerator, denominator)
    plain = f"{numerator} / {denominator}"
    return plain if reduced == plain else f"{plain} = {reduced}"


def _int(rng: np.random.Generator, low: int, high: int, step: int = 1) -> int:
    """A uniform integer from low..high (inclusive) on a grid of `step`."""
    return int(low + step * rng.integers(0, (high - low) // step + 1))


def _numeric_distractors(rng: np.random.Generator, answer: int, count: int = 4) -> list[str]:
    """`count` distinct positive integers near `answer`, none equal to it."""
    step = max(1, round(abs(answer) * 0.1))
    candidates = {answer + k * step for k in (-4, -3, -2, -1, 1, 2, 3, 4)}
    candidates |= {answer * 2, answer + 1, answer - 1}
    if answer % 2 == 0:
        candidates.add(answer // 2)
    candidates = sorted(c for c in candidates if c > 0 and c != answer)
    picked = rng.choice(len(candidates), size=count, replace=False)
    return [_num(candidates[i]) for i in sorted(picked)]


def _fraction_distractors(rng: np.random.Generator, numerator: int, denominator: int, count: int = 4) -> list[str]:
    """`count` distinct fractions in (0, 1] near numerator/denominator, none equal to it."""
    answer = _frac(numerator, denominator)
    candidates = set()
    for n, d in ((numerator + 1, denominator), (numerator - 1, denominator), (numerator, denominator + 1),
                 (numerator, denominator - 1), (denominator - numerator, denominator), (numerator, 2 * denominator),
                 (numerator + 2, denominator), (1, denominator), (numerator + 1, denominator + 1)):
        if 0 < n <= d:
            candidates.add(_frac(n, d))
    candidates = sorted(candidates - {answer})
    picked = rng.choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(picked)]


# Each template returns (problem, rationale without the final "answer : x", answer text, distractors,
# annotated_formula, linear_formula, category). Numbers are drawn so that answers come out exact.

def _speed(rng):
    speed, hours = _int(rng, 20, 120, 5), _int(rng, 2, 9)
    distance = speed * hours
    vehicle = ("train", "car", "bus", "cyclist")[rng.integers(4)]
    problem = f"a {vehicle} travels {distance} km in {hours} hours . what is its speed in km / hr ?"
    rationale = f"speed = distance / time = {distance} / {hours} = {speed} km / hr ."
    return (problem, rationale, _num(speed), _numeric_distractors(rng, speed),
            f"divide({distance}, {hours})", "divide(n0,n1)|", "physics")


def _travel_time(rng):
    speed, hours = _int(rng, 30, 90, 5), _int(rng, 2, 12)
    distance = speed * hours
    problem = (f"a car moving at a speed of {speed} km / hr covers a distance of {distance} km . "
               f"how many hours does the journey take ?")
    rationale = f"time = distance / speed = {distance} / {speed} = {hours} hours ."
    return (problem, rationale, _num(hours), _numeric_distractors(rng, hours),
            f"divide({distance}, {speed})", "divide(n1,n0)|", "physics")


def _train_pole(rng):
    metres_per_s = (10, 15, 20, 25, 30)[rng.integers(5)]  # multiples of 5 m/s are whole km/hr
    seconds = _int(rng, 4, 20)
    length = metres_per_s * seconds
    km_per_hr = metres_per_s * 18 // 5
    problem = (f"a train {length} m long passes a pole in {seconds} seconds . "
               f"what is the speed of the train in km / hr ?")
    rationale = (f"speed = {length} / {seconds} = {metres_per_s} m / s . "
                 f"{metres_per_s} m / s = {metres_per_s} * 18 / 5 = {km_per_hr} km / hr .")
    return (problem, rationale, _num(km_per_hr), _numeric_distractors(rng, km_per_hr),
            f"multiply(divide({length}, {seconds}), const_3_6)", "divide(n0,n1)|multiply(#0,const_3_6)|", "physics")


# Pairs of whole days whose combined time a*b/(a+b) is whole as well.
_WORK_PAIRS = tuple((a, b) for a in range(2, 41) for b in range(a + 1, 61) if (a * b) % (a + b) == 0)


def _work_together(rng):
    a, b = _WORK_PAIRS[rng.integers(len(_WORK_PAIRS))]
    together = a * b // (a + b)
    problem = (f"a can do a piece of work in {a} days and b can do it in {b} days . "
               f"in how many days can they finish it working together ?")
    rationale = (f"a ' s one day work = 1 / {a} , b ' s one day work = 1 / {b} . together = 1 / {a} + 1 / {b} "
                 f"= {a + b} / {a * b} = 1 / {together} . so they finish in {together} days .")
    return (problem, rationale, _num(together), _numeric_distractors(rng, together),
            f"divide(multiply({a}, {b}), add({a}, {b}))", "multiply(n0,n1)|add(n0,n1)|divide(#0,#1)|", "physics")


def _profit_percent(rng):
    cost, percent = _int(rng, 100, 2000, 20), _int(rng, 5, 50, 5)
    profit = cost * percent // 100  # cost is a multiple of 20 and percent of 5: exact
    price = cost + profit
    problem = (f"a shopkeeper buys an article for rs . {cost} and sells it for rs . {price} . "
               f"what is his profit percent ?")
    rationale = (f"profit = {price} - {cost} = rs . {profit} . "
                 f"profit % = {profit} / {cost} * 100 = {percent} % .")
    return (problem, rationale, _num(percent), _numeric_distractors(rng, percent),
            f"multiply(divide(subtract({price}, {cost}), {cost}), const_100)",
            "subtract(n1,n0)|divide(#0,n0)|multiply(#1,const_100)|", "gain")


def _simple_interest(rng):
    principal, rate, years = _int(rng, 500, 10000, 100), _int(rng, 2, 15), _int(rng, 2, 8)
    interest = principal * rate * years // 100
    problem = f"find the simple interest on rs . {principal} at {rate} % per annum for {years} years ."
    rationale = f"s . i . = p * r * t / 100 = {principal} * {rate} * {years} / 100 = rs . {interest} ."
    return (problem, rationale, _num(interest), _numeric_distractors(rng, interest),
            f"divide(multiply(multiply({principal}, {rate}), {years}), const_100)",
            "multiply(n0,n1)|multiply(n2,#0)|divide(#1,const_100)|", "gain")


def _percent_of(rng):
    number, percent = _int(rng, 40, 2000, 20), _int(rng, 5, 95, 5)
    value = number * percent // 100
    problem = f"what is {percent} % of {number} ?"
    rationale = f"{percent} % of {number} = {percent} / 100 * {number} = {value} ."
    return (problem, rationale, _num(value), _numeric_distractors(rng, value),
            f"divide(multiply({percent}, {number}), const_100)", "multiply(n0,n1)|divide(#0,const_100)|", "general")


def _rectangle_area(rng):
    length, breadth = _int(rng, 5, 60), _int(rng, 3, 40)
    area = length * breadth
    problem = f"the length of a rectangle is {length} m and its breadth is {breadth} m . find its area in sq . m ."
    rationale = f"area = length * breadth = {length} * {breadth} = {area} sq . m ."
    return (problem, rationale, _num(area), _numeric_distractors(rng, area),
            f"rectangle_area({length}, {breadth})", "rectangle_area(n0,n1)|", "geometry")


def _rectangle_perimeter(rng):
    length, breadth = _int(rng, 5, 80), _int(rng, 3, 50)
    perimeter = 2 * (length + breadth)
    problem = f"find the perimeter of a rectangular field {length} m long and {breadth} m wide ."
    rationale = f"perimeter = 2 * ( length + breadth ) = 2 * ( {length} + {breadth} ) = {perimeter} m ."
    return (problem, rationale, _num(perimeter), _numeric_distractors(rng, perimeter),
            f"rectangle_perimeter({length}, {breadth})", "rectangle_perimeter(n0,n1)|", "geometry")


def _square_area(rng):
    side = _int(rng, 3, 40)
    perimeter = 4 * side
    area = side * side
    problem = f"the perimeter of a square is {perimeter} cm . find its area in sq . cm ."
    rationale = f"side = {perimeter} / 4 = {side} cm . area = {side} * {side} = {area} sq . cm ."
    return (problem, rationale, _num(area), _numeric_distractors(rng, area),
            f"square_area(divide({perimeter}, const_4))", "divide(n0,const_4)|square_area(#0)|", "geometry")


def _ratio_share(rng):
    while True:
        a, b = _int(rng, 1, 9), _int(rng, 2, 11)
        if a < b and math.gcd(a, b) == 1:
            break
    unit = _int(rng, 3, 40)
    total, larger = (a + b) * unit, b * unit
    problem = f"two numbers are in the ratio {a} : {b} and their sum is {total} . find the larger number ."
    rationale = f"larger number = {total} * {b} / ( {a} + {b} ) = {total} * {b} / {a + b} = {larger} ."
    return (problem, rationale, _num(larger), _numeric_distractors(rng, larger),
            f"multiply(divide({total}, add({a}, {b})), {b})", "add(n0,n1)|divide(n2,#0)|multiply(n1,#1)|", "other")


def _average(rng):
    count = _int(rng, 3, 5)
    mean = _int(rng, 45, 85)
    while True:
        marks = [mean + int(rng.integers(-15, 16)) for _ in range(count - 1)]
        marks.append(mean * count - sum(marks))  # forces a whole average
        if 20 <= marks[-1] <= 100:
            break
    listed = " , ".join(str(m) for m in marks[:-1]) + f" and {marks[-1]}"
    problem = f"a student scored {listed} marks in {count} tests . what is his average score ?"
    rationale = f"average = ( {' + '.join(str(m) for m in marks)} ) / {count} = {mean * count} / {count} = {mean} ."
    formula = str(marks[0])
    linear = []
    for i, m in enumerate(marks[1:], start=1):
        formula = f"add({formula}, {m})"
        linear.append("add(n0,n1)" if i == 1 else f"add(n{i},#{i - 2})")
    linear.append(f"divide(#{count - 2},n{count})")
    return (problem, rationale, _num(mean), _numeric_distractors(rng, mean),
            f"divide({formula}, {count})", "|".join(linear) + "|", "general")


def _ball_draw(rng):
    red, blue = _int(rng, 2, 12), _int(rng, 2, 12)
    asked = ("red", "blue")[rng.integers(2)]
    favourable = red if asked == "red" else blue
    total = red + blue
    problem = (f"a bag contains {red} red and {blue} blue balls . one ball is drawn at random . "
               f"what is the probability that it is {asked} ?")
    rationale = (f"total balls = {red} + {blue} = {total} . "
                 f"p ( {asked} ) = {_equals_reduced(favourable, total)} .")
    index = "n0" if asked == "red" else "n1"
    return (problem, rationale, _frac(favourable, total), _fraction_distractors(rng, favourable, total),
            f"divide({favourable}, add({red}, {blue}))", f"add(n0,n1)|divide({index},#0)|", "probability")


def _dice_sum(rng):
    # Sums 6 and 8 have 5 ways, and MathQA's program language has no const_5.
    target = (2, 3, 4, 5, 7, 9, 10, 11, 12)[rng.integers(9)]
    ways = 6 - abs(7 - target)  # number of (d1, d2) pairs with d1 + d2 = target
    problem = f"two dice are thrown together . what is the probability that the sum of the numbers is {target} ?"
    rationale = (f"total outcomes = 6 * 6 = 36 . outcomes with sum {target} = {ways} . "
                 f"probability = {_equals_reduced(ways, 36)} .")
    return (problem, rationale, _frac(ways, 36), _fraction_distractors(rng, ways, 36),
            f"divide(const_{ways}, multiply(const_6, const_6))", f"multiply(const_6,const_6)|divide(const_{ways},#0)|",
            "probability")


TEMPLATES = (_speed, _travel_time, _train_pole, _work_together, _profit_percent, _simple_interest, _percent_of,
             _rectangle_area, _rectangle_perimeter, _square_area, _ratio_share, _average, _ball_draw, _dice_sum)


def is_held_out(problem: str) -> bool:
    """Whether the problem text `problem` is reserved for evaluation splits (a fixed 1/HELD_OUT_EVERY of
    all texts, by sha256: the same in every process, for every seed)."""
    digest = hashlib.sha256(_HELD_OUT_SALT + problem.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_EVERY == 0


def make_problem(seed: int, index: int, held_out: bool = False) -> dict:
    """Problem `index` of the corpus with `seed`: a dict of MathQA's seven string fields.

    Its problem text is held out (`is_held_out`) exactly when `held_out` is: draws that land on the
    other side are redrawn from (seed, index, draw).
    """
    for draw in range(MAX_DRAWS):
        rng = np.random.default_rng([seed, index] if draw == 0 else [seed, index, draw])
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        problem, rationale, answer, distractors, annotated, linear, category = template(rng)
        if is_held_out(problem) == held_out:
            break
    else:
        raise RuntimeError(f"no {'held-out' if held_out else 'training'} problem in {MAX_DRAWS} draws")
    # Shuffle the answer among the distractors so neither its position nor any ordering gives it away;
    # sometimes option e is MathQA's "none of these" (never the answer, as in most MathQA rows).
    values = list(distractors[:3]) + [answer] if rng.random() < 0.25 else list(distractors) + [answer]
    values = [values[i] for i in rng.permutation(len(values))]
    correct = values.index(answer)
    if len(values) == 4:
        values.append("none of these")
    options = " , ".join(f"{letter} ) {value}" for letter, value in zip(LETTERS, values))
    letter = LETTERS[correct]
    return {
        "Problem": problem,
        "Rationale": f"{rationale} answer : {letter}",
        "options": options,
        "correct": letter,
        "annotated_formula": annotated,
        "linear_formula": linear,
        "category": category,
    }


def generate_problems(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """`n` synthetic MathQA-style records; the same (n, seed, held_out) always gives the same list.

    held_out=False (training corpora) never yields a held-out problem text, held_out=True (evaluation
    splits) only those.
    """
    return [make_problem(seed, i, held_out) for i in range(n)]


def format_document(record: dict) -> str:
    """Pretraining text of one record: four lines, "Problem: ...", "Options: ...", "Rationale: ...", "Answer: x"."""
    return (f"Problem: {record['Problem']}\nOptions: {record['options']}\n"
            f"Rationale: {record['Rationale']}\nAnswer: {record['correct']}")
