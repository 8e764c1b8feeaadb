"""Deterministic generator of grade-school math word problems (GSM8K style).

This is the embedded default corpus: it lets training run without downloading
a dataset. Each document is a question paragraph followed by a short worked
solution in which every arithmetic step is written out as ``a <op> b = c``,
and a final ``#### <answer>`` line, mirroring the GSM8K format.

All randomness flows through an explicit :class:`random.Random` instance so a
given seed yields byte-identical documents in every process (no reliance on
``hash()`` of strings or on the global random state).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, NamedTuple

__all__ = [
    "MathProblem",
    "TEMPLATE_NAMES",
    "generate_problem",
    "generate_math_problems",
    "generate_math_corpus",
]


@dataclass(frozen=True)
class MathProblem:
    """One generated word problem.

    Attributes:
        template: Name of the template that produced the problem (one of
            :data:`TEMPLATE_NAMES`).
        question: The word-problem paragraph.
        solution: Worked steps, one per line, ending with ``#### <answer>``.
        answer: The integer final answer.
    """

    template: str
    question: str
    solution: str
    answer: int

    @property
    def text(self) -> str:
        """The full document: question, newline, worked solution."""
        return self.question + "\n" + self.solution


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


class _Person(NamedTuple):
    name: str
    he: str
    him: str
    his: str


_FEMALE_NAMES = (
    "Ava", "Maya", "Sofia", "Lena", "Priya", "Chloe", "Hana", "Zoe", "Nora",
    "Amara", "Julia", "Leila", "Grace", "Mei", "Rosa", "Fatima", "Emma",
    "Olivia", "Ines", "Keiko", "Tara", "Naomi", "Elena", "Aisha", "Lucy",
    "Carmen", "Ruby", "Yara", "Beth", "Ingrid",
)
_MALE_NAMES = (
    "Sam", "Liam", "Noah", "Omar", "Ravi", "Diego", "Kenji", "Lucas", "Ethan",
    "Mateo", "Arjun", "Felix", "Hugo", "Tariq", "Jonah", "Ben", "Kofi",
    "Marco", "Oscar", "Yusuf", "Leo", "Ivan", "Jamal", "Theo", "Pablo",
    "Henry", "Aiden", "Malik", "Tom", "Viktor",
)

# Split by gender so a relation word never contradicts the pronoun used later.
_RELATIVES_HE = ("brother", "cousin", "friend", "neighbor", "classmate")
_RELATIVES_SHE = ("sister", "cousin", "friend", "neighbor", "classmate")

# Countable things people collect or share: (singular, plural).
_COUNTABLES = (
    ("marble", "marbles"), ("sticker", "stickers"), ("candy", "candies"),
    ("baseball card", "baseball cards"), ("seashell", "seashells"),
    ("cookie", "cookies"), ("pencil", "pencils"), ("stamp", "stamps"),
    ("bead", "beads"), ("crayon", "crayons"), ("button", "buttons"),
    ("grape", "grapes"), ("coin", "coins"), ("toy car", "toy cars"),
)


def _person(rng: random.Random) -> _Person:
    if rng.random() < 0.5:
        return _Person(rng.choice(_FEMALE_NAMES), "she", "her", "her")
    return _Person(rng.choice(_MALE_NAMES), "he", "him", "his")


def _two_people(rng: random.Random) -> tuple[_Person, _Person]:
    # Re-draw until names differ so sentences like "Sam gives Sam ..." never occur.
    first = _person(rng)
    second = _person(rng)
    while second.name == first.name:
        second = _person(rng)
    return first, second


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


# ---------------------------------------------------------------------------
# Templates: each takes the RNG and returns (question, steps, answer).
# Every step that shows arithmetic uses plain numbers on both sides of "="
# (no "$" or units inside the expression) so it can be checked mechanically.
# ---------------------------------------------------------------------------

_TemplateFn = Callable[[random.Random], tuple[str, list[str], int]]
_TEMPLATES: dict[str, _TemplateFn] = {}


def _template(name: str) -> Callable[[_TemplateFn], _TemplateFn]:
    def register(fn: _TemplateFn) -> _TemplateFn:
        _TEMPLATES[name] = fn
        return fn

    return register


@_template("shopping_change")
def _shopping_change(rng: random.Random) -> tuple[str, list[str], int]:
    items = (
        ("notebook", "notebooks", 2, 6), ("sandwich", "sandwiches", 3, 8),
        ("comic book", "comic books", 3, 9), ("potted plant", "potted plants", 4, 12),
        ("bag of apples", "bags of apples", 2, 7), ("paintbrush", "paintbrushes", 1, 5),
        ("movie ticket", "movie tickets", 6, 14), ("pair of socks", "pairs of socks", 2, 6),
    )
    p = _person(rng)
    _, plural, lo, hi = rng.choice(items)
    count = rng.randint(2, 7)
    price = rng.randint(lo, hi)
    total = count * price
    bill = min(b for b in (10, 20, 50, 100, 200) if b > total)
    change = bill - total
    question = (
        f"{p.name} buys {count} {plural} that cost ${price} each. "
        f"{_cap(p.he)} pays with a ${bill} bill. "
        f"How much change, in dollars, does {p.he} get back?"
    )
    steps = [
        f"The {plural} cost {count} * {price} = {total} dollars in total.",
        f"{p.name}'s change is {bill} - {total} = {_count(change, 'dollar', 'dollars')}.",
    ]
    return question, steps, change


@_template("ages")
def _ages(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = _two_people(rng)
    relation = rng.choice(_RELATIVES_HE if b.he == "he" else _RELATIVES_SHE)
    age_a = rng.randint(4, 16)
    gap = rng.randint(2, 12)
    years = rng.randint(2, 15)
    age_b = age_a + gap
    future_a = age_a + years
    future_b = age_b + years
    total = future_a + future_b
    question = (
        f"{a.name} is {age_a} years old. {a.his.capitalize()} {relation} {b.name} "
        f"is {gap} years older than {a.him}. "
        f"What will the sum of their ages be in {years} years?"
    )
    steps = [
        f"{b.name} is {age_a} + {gap} = {age_b} years old now.",
        f"In {years} years, {a.name} will be {age_a} + {years} = {future_a} "
        f"and {b.name} will be {age_b} + {years} = {future_b}.",
        f"The sum of their ages will be {future_a} + {future_b} = {total} years.",
    ]
    return question, steps, total


@_template("speed_distance")
def _speed_distance(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    vehicle = rng.choice(("car", "truck", "motorcycle", "van", "bus"))
    speed1 = rng.randint(6, 14) * 5
    speed2 = rng.randint(6, 14) * 5
    hours1 = rng.randint(1, 5)
    hours2 = rng.randint(1, 4)
    leg1 = speed1 * hours1
    leg2 = speed2 * hours2
    total = leg1 + leg2
    question = (
        f"{p.name} drives {p.his} {vehicle} at {speed1} miles per hour for "
        f"{hours1} hours, then at {speed2} miles per hour for {hours2} hours. "
        f"How many miles does {p.he} drive in total?"
    )
    steps = [
        f"In the first part {p.he} drives {speed1} * {hours1} = {leg1} miles.",
        f"In the second part {p.he} drives {speed2} * {hours2} = {leg2} miles.",
        f"Altogether {p.he} drives {leg1} + {leg2} = {total} miles.",
    ]
    return question, steps, total


@_template("work_rate")
def _work_rate(rng: random.Random) -> tuple[str, list[str], int]:
    jobs = (
        ("bakery", "bake", "loaves of bread"), ("pottery studio", "make", "mugs"),
        ("toy shop", "assemble", "toy trains"), ("print shop", "print", "posters"),
        ("flower shop", "arrange", "bouquets"), ("bike shop", "repair", "bikes"),
        ("tailor shop", "sew", "shirts"),
    )
    p = _person(rng)
    place, verb, things = rng.choice(jobs)
    rate = rng.randint(2, 12)
    hours = rng.randint(3, 9)
    days = rng.randint(2, 6)
    daily = rate * hours
    made = daily * days
    order = made + rng.randint(5, 60)
    remaining = order - made
    question = (
        f"{p.name} works at a {place} and can {verb} {rate} {things} per hour. "
        f"{_cap(p.he)} works {hours} hours a day for {days} days. "
        f"A customer ordered {order} {things}. "
        f"How many more {things} are still needed to finish the order?"
    )
    steps = [
        f"Each day {p.he} can {verb} {rate} * {hours} = {daily} {things}.",
        f"In {days} days {p.he} can {verb} {daily} * {days} = {made} {things}.",
        f"The order still needs {order} - {made} = {remaining} {things}.",
    ]
    return question, steps, remaining


_FRACTION_WORDS = {
    (1, 2): "half", (1, 3): "one third", (2, 3): "two thirds",
    (1, 4): "one quarter", (3, 4): "three quarters", (1, 5): "one fifth",
    (2, 5): "two fifths", (3, 5): "three fifths", (1, 6): "one sixth",
    (5, 6): "five sixths",
}


@_template("fraction_of_quantity")
def _fraction_of_quantity(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = _two_people(rng)
    singular, plural = rng.choice(_COUNTABLES)
    num, den = rng.choice(sorted(_FRACTION_WORDS))
    words = _FRACTION_WORDS[(num, den)]
    unit = rng.randint(3, 15)
    total = unit * den
    given = unit * num
    left = total - given
    lost = rng.randint(1, left - 1) if left > 1 else 0
    final = left - lost
    question = (
        f"{a.name} has {total} {plural}. {_cap(a.he)} gives {words} of them to "
        f"{b.name}"
        + (f" and later loses {lost} more" if lost else "")
        + f". How many {plural} does {a.name} have left?"
    )
    steps = [f"One {_denominator_word(den)} of {total} is {total} / {den} = {unit}."]
    if num > 1:
        steps.append(f"So {a.he} gives away {unit} * {num} = {given} {plural}.")
    steps.append(f"That leaves {total} - {given} = {left} {plural}.")
    if lost:
        steps.append(
            f"After losing {lost}, {a.he} has {left} - {lost} = {_count(final, singular, plural)}."
        )
    return question, steps, final


def _denominator_word(den: int) -> str:
    return {2: "half", 3: "third", 4: "quarter", 5: "fifth", 6: "sixth"}[den]


@_template("percent_discount")
def _percent_discount(rng: random.Random) -> tuple[str, list[str], int]:
    items = ("jacket", "lamp", "backpack", "pair of boots", "board game",
             "blender", "tennis racket", "desk chair", "guitar", "rug")
    p = _person(rng)
    item = rng.choice(items)
    # Multiples of 20 with multiple-of-5 percentages keep every step an integer.
    price = rng.randint(1, 12) * 20
    percent = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
    qty = rng.randint(2, 4)
    saving = price * percent // 100
    sale = price - saving
    total = qty * sale
    question = (
        f"A {item} normally costs ${price}. This week the store has {percent}% off "
        f"everything. {p.name} buys {qty} of them at the sale price. "
        f"How many dollars does {p.he} pay?"
    )
    steps = [
        f"The discount on one is {price} * {percent} / 100 = {saving} dollars.",
        f"So one costs {price} - {saving} = {sale} dollars on sale.",
        f"For {qty} of them {p.he} pays {qty} * {sale} = {total} dollars.",
    ]
    return question, steps, total


@_template("fence_perimeter")
def _fence_perimeter(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    place = rng.choice(("garden", "yard", "chicken pen", "dog run", "vegetable patch"))
    length = rng.randint(5, 30)
    width = rng.randint(3, length)
    cost = rng.randint(2, 9)
    perimeter = 2 * length + 2 * width
    total = perimeter * cost
    question = (
        f"{p.name} wants to put a fence around a rectangular {place} that is "
        f"{length} meters long and {width} meters wide. Fencing costs ${cost} per "
        f"meter. How many dollars will the fence cost?"
    )
    steps = [
        f"The perimeter is 2 * {length} + 2 * {width} = {perimeter} meters.",
        f"The fence costs {perimeter} * {cost} = {total} dollars.",
    ]
    return question, steps, total


@_template("floor_tiles")
def _floor_tiles(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    room = rng.choice(("kitchen", "bathroom", "hallway", "playroom", "basement", "porch"))
    length = rng.randint(6, 20)
    width = rng.randint(4, 15)
    area = length * width
    # Box sizes are restricted to exact divisors so the box count is whole;
    # the room length itself always qualifies, so the list is never empty.
    sizes = [d for d in range(4, 31) if area % d == 0 and area // d >= 2]
    per_box = rng.choice(sizes)
    boxes = area // per_box
    price = rng.randint(8, 35)
    total = boxes * price
    question = (
        f"{p.name} is tiling a {room} floor that measures {length} feet by {width} "
        f"feet. Each box of tiles covers {per_box} square feet and costs ${price}. "
        f"How many dollars will {p.he} spend on tiles?"
    )
    steps = [
        f"The floor area is {length} * {width} = {area} square feet.",
        f"{_cap(p.he)} needs {area} / {per_box} = {boxes} boxes.",
        f"The boxes cost {boxes} * {price} = {total} dollars.",
    ]
    return question, steps, total


@_template("average_needed")
def _average_needed(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    subject = rng.choice(("math", "science", "history", "spelling", "music", "French"))
    tests = rng.randint(3, 5)
    target = rng.randint(72, 92)
    while True:
        scores = [rng.randint(target - 12, min(100, target + 12)) for _ in range(tests - 1)]
        needed = target * tests - sum(scores)
        if 40 <= needed <= 100:
            break
    goal = target * tests
    so_far = sum(scores)
    listed = ", ".join(str(s) for s in scores[:-1]) + f" and {scores[-1]}"
    question = (
        f"{p.name} scored {listed} on {p.his} first {tests - 1} {subject} tests. "
        f"What score does {p.he} need on the next test to have an average of "
        f"exactly {target} over all {tests} tests?"
    )
    steps = [
        f"An average of {target} over {tests} tests needs {tests} * {target} = {goal} points.",
        f"So far {p.he} has {' + '.join(str(s) for s in scores)} = {so_far} points.",
        f"{_cap(p.he)} needs {goal} - {so_far} = {needed} on the last test.",
    ]
    return question, steps, needed


@_template("ribbon_inches")
def _ribbon_inches(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    material = rng.choice(("ribbon", "rope", "string", "yarn", "wire", "lace"))
    feet = rng.randint(2, 12)
    inches = feet * 12
    piece = rng.choice([d for d in range(2, 19) if inches % d == 0 and d != inches])
    pieces = inches // piece
    question = (
        f"{p.name} has a piece of {material} that is {feet} feet long. {_cap(p.he)} "
        f"cuts it into pieces that are each {piece} inches long. "
        f"How many pieces does {p.he} get? (There are 12 inches in a foot.)"
    )
    steps = [
        f"The {material} is {feet} * 12 = {inches} inches long.",
        f"{_cap(p.he)} gets {inches} / {piece} = {pieces} pieces.",
    ]
    return question, steps, pieces


@_template("practice_minutes")
def _practice_minutes(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    activity = rng.choice(("the piano", "the violin", "soccer", "chess", "swimming",
                           "drawing", "basketball", "the drums"))
    hours = rng.randint(1, 3)
    minutes = rng.choice((5, 10, 15, 20, 25, 30, 35, 40, 45, 50))
    days = rng.randint(2, 7)
    base = hours * 60
    daily = base + minutes
    total = daily * days
    question = (
        f"{p.name} practices {activity} for {hours} hour{'s' if hours > 1 else ''} and "
        f"{minutes} minutes every day. How many minutes does {p.he} practice "
        f"in {days} days?"
    )
    steps = [
        f"{hours} hour{'s' if hours > 1 else ''} is {hours} * 60 = {base} minutes.",
        f"Each day {p.he} practices {base} + {minutes} = {daily} minutes.",
        f"In {days} days that is {daily} * {days} = {total} minutes.",
    ]
    return question, steps, total


@_template("store_hours")
def _store_hours(rng: random.Random) -> tuple[str, list[str], int]:
    shop = rng.choice(("bakery", "library", "cafe", "bookstore", "pharmacy",
                       "hardware store", "ice cream shop", "museum"))
    opens = rng.randint(6, 11)
    closes = rng.randint(3, 9)
    per_hour = rng.randint(4, 30)
    morning = 12 - opens
    hours = morning + closes
    total = hours * per_hour
    question = (
        f"A {shop} opens at {opens} a.m. and closes at {closes} p.m. every day. "
        f"On average {per_hour} customers visit each hour it is open. "
        f"How many customers visit in one day?"
    )
    steps = [
        f"From {opens} a.m. to noon is 12 - {opens} = {morning} hours.",
        f"From noon to {closes} p.m. is {closes} more hours, so it is open "
        f"{morning} + {closes} = {hours} hours.",
        f"That is {hours} * {per_hour} = {total} customers.",
    ]
    return question, steps, total


@_template("share_remainder")
def _share_remainder(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    singular, plural = rng.choice(_COUNTABLES)
    friends = rng.randint(3, 9)
    each = rng.randint(2, 12)
    left = rng.randint(1, friends - 1)
    shared = friends * each
    total = shared + left
    question = (
        f"{p.name} has {total} {plural} and shares them equally among {friends} "
        f"friends, giving each friend as many as possible. "
        f"How many {plural} are left over?"
    )
    steps = [
        f"Giving each friend {each} uses {friends} * {each} = {shared} {plural}.",
        f"One more each would need {shared} + {friends} = {shared + friends}, "
        f"which is more than {total}.",
        f"So {total} - {shared} = {_count(left, singular, plural)} "
        f"{'is' if left == 1 else 'are'} left over.",
    ]
    return question, steps, left


@_template("multi_purchase")
def _multi_purchase(rng: random.Random) -> tuple[str, list[str], int]:
    stores = (
        ("school supplies", (("notebooks", 2, 5), ("pens", 1, 3), ("folders", 1, 4),
                             ("rulers", 1, 3), ("glue sticks", 1, 2))),
        ("groceries", (("cartons of milk", 2, 5), ("loaves of bread", 2, 6),
                       ("boxes of cereal", 3, 7), ("jars of jam", 3, 6), ("lemons", 1, 2))),
        ("party supplies", (("balloons", 1, 2), ("party hats", 1, 3),
                            ("packs of napkins", 2, 5), ("candles", 1, 2), ("banners", 4, 9))),
        ("garden supplies", (("seed packets", 1, 4), ("flower pots", 3, 8),
                             ("bags of soil", 4, 9), ("gloves", 2, 6))),
    )
    p = _person(rng)
    kind, goods = rng.choice(stores)
    chosen = rng.sample(goods, 3)
    lines = []
    costs = []
    for name, lo, hi in chosen:
        qty = rng.randint(2, 8)
        price = rng.randint(lo, hi)
        lines.append((name, qty, price))
        costs.append(qty * price)
    total = sum(costs)
    bought = ", ".join(f"{q} {n} at ${pr} each" for n, q, pr in lines[:-1])
    last_name, last_qty, last_price = lines[-1]
    question = (
        f"{p.name} is buying {kind}. {_cap(p.he)} buys {bought}, and {last_qty} "
        f"{last_name} at ${last_price} each. How many dollars does {p.he} spend?"
    )
    steps = [
        f"The {n} cost {q} * {pr} = {c} dollars." for (n, q, pr), c in zip(lines, costs)
    ]
    steps.append(f"In total {p.he} spends {' + '.join(map(str, costs))} = {total} dollars.")
    return question, steps, total


@_template("savings_weeks")
def _savings_weeks(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    goal_item = rng.choice(("bike", "video game console", "telescope", "skateboard",
                            "tablet", "keyboard", "camera", "pair of roller skates"))
    weekly = rng.randint(3, 25)
    weeks = rng.randint(3, 20)
    saved = rng.randint(5, 80)
    remaining = weekly * weeks
    price = saved + remaining
    question = (
        f"{p.name} wants to buy a {goal_item} that costs ${price}. {_cap(p.he)} "
        f"already has ${saved} saved and puts away ${weekly} every week. "
        f"How many weeks will it take {p.him} to have enough money?"
    )
    steps = [
        f"{_cap(p.he)} still needs {price} - {saved} = {remaining} dollars.",
        f"At {weekly} dollars a week that takes {remaining} / {weekly} = {weeks} weeks.",
    ]
    return question, steps, weeks


@_template("recipe_scaling")
def _recipe_scaling(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    dish = rng.choice(("pancakes", "muffins", "cookies", "banana bread", "waffles",
                       "scones", "brownies"))
    ing1, ing2 = rng.sample(("flour", "sugar", "milk", "oats", "water", "yogurt"), 2)
    servings = rng.randint(2, 8)
    factor = rng.randint(2, 6)
    target = servings * factor
    cups1 = rng.randint(1, 5)
    cups2 = rng.randint(1, 4)
    need1 = cups1 * factor
    need2 = cups2 * factor
    total = need1 + need2
    question = (
        f"A recipe for {dish} makes {servings} servings and uses {cups1} cups of "
        f"{ing1} and {cups2} cups of {ing2}. {p.name} wants to make {target} servings. "
        f"How many cups of {ing1} and {ing2} together does {p.he} need?"
    )
    steps = [
        f"{_cap(p.he)} is making {target} / {servings} = {factor} times the recipe.",
        f"That needs {cups1} * {factor} = {need1} cups of {ing1} and "
        f"{cups2} * {factor} = {need2} cups of {ing2}.",
        f"Together that is {need1} + {need2} = {total} cups.",
    ]
    return question, steps, total


@_template("ratio_split")
def _ratio_split(rng: random.Random) -> tuple[str, list[str], int]:
    groups = (
        ("a school club", "boys", "girls"), ("a farm", "chickens", "ducks"),
        ("a parking lot", "cars", "trucks"), ("a bowl", "red apples", "green apples"),
        ("a library shelf", "novels", "comics"), ("an aquarium", "goldfish", "guppies"),
    )
    place, first, second = rng.choice(groups)
    a = rng.randint(1, 7)
    b = rng.randint(1, 7)
    while b == a:
        b = rng.randint(1, 7)
    parts = a + b
    unit = rng.randint(2, 15)
    total = parts * unit
    count = unit * b
    question = (
        f"In {place} the ratio of {first} to {second} is {a} to {b}. "
        f"There are {total} {first} and {second} altogether. "
        f"How many {second} are there?"
    )
    steps = [
        f"The ratio has {a} + {b} = {parts} parts.",
        f"Each part is {total} / {parts} = {unit}.",
        f"There are {unit} * {b} = {count} {second}.",
    ]
    return question, steps, count


@_template("sales_days")
def _sales_days(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    goods = rng.choice(("cupcakes", "bracelets", "raffle tickets", "candles",
                        "jars of honey", "newspapers", "plants"))
    monday = rng.randint(5, 40)
    mult = rng.choice((2, 3))
    tuesday = monday * mult
    fewer = rng.randint(1, tuesday - 1)
    wednesday = tuesday - fewer
    total = monday + tuesday + wednesday
    times = {2: "twice", 3: "three times"}[mult]
    question = (
        f"{p.name} sold {monday} {goods} on Monday. On Tuesday {p.he} sold {times} "
        f"as many as on Monday, and on Wednesday {p.he} sold {fewer} fewer than on "
        f"Tuesday. How many {goods} did {p.he} sell over the three days?"
    )
    steps = [
        f"On Tuesday {p.he} sold {monday} * {mult} = {tuesday} {goods}.",
        f"On Wednesday {p.he} sold {tuesday} - {fewer} = {wednesday} {goods}.",
        f"In total {p.he} sold {monday} + {tuesday} + {wednesday} = {total} {goods}.",
    ]
    return question, steps, total


@_template("stand_profit")
def _stand_profit(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    stand, unit = rng.choice((
        ("lemonade stand", "cups of lemonade"), ("bake sale table", "brownies"),
        ("car wash", "car washes"), ("craft booth", "keychains"),
        ("flower stall", "bunches of tulips"), ("snack cart", "pretzels"),
    ))
    sold = rng.randint(10, 60)
    price = rng.randint(1, 6)
    revenue = sold * price
    supplies = rng.randint(3, revenue - 1)
    profit = revenue - supplies
    question = (
        f"{p.name} runs a {stand}. {_cap(p.he)} spent ${supplies} on supplies and "
        f"sold {sold} {unit} for ${price} each. How many dollars of profit did "
        f"{p.he} make?"
    )
    steps = [
        f"{_cap(p.he)} took in {sold} * {price} = {revenue} dollars.",
        f"The profit is {revenue} - {supplies} = {_count(profit, 'dollar', 'dollars')}.",
    ]
    return question, steps, profit


@_template("reading_pages")
def _reading_pages(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    book = rng.choice(("mystery novel", "science book", "biography", "fantasy book",
                       "history book", "cookbook", "poetry collection"))
    rate1 = rng.randint(5, 30)
    days1 = rng.randint(2, 7)
    rate2 = rng.randint(10, 40)
    days2 = rng.randint(2, 8)
    read = rate1 * days1
    left = rate2 * days2
    pages = read + left
    question = (
        f"{p.name} is reading a {pages}-page {book}. {_cap(p.he)} reads {rate1} pages "
        f"a day for {days1} days. Then {p.he} speeds up to {rate2} pages a day. "
        f"How many more days does it take {p.him} to finish the book?"
    )
    steps = [
        f"In the first {days1} days {p.he} reads {rate1} * {days1} = {read} pages.",
        f"That leaves {pages} - {read} = {left} pages.",
        f"At {rate2} pages a day that takes {left} / {rate2} = {days2} more days.",
    ]
    return question, steps, days2


@_template("overtime_pay")
def _overtime_pay(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    job = rng.choice(("cashier", "lifeguard", "waiter", "delivery driver",
                      "warehouse worker", "tutor", "gardener"))
    # Even hourly wages keep the 1.5x overtime rate a whole number.
    wage = rng.randint(5, 15) * 2
    regular = rng.randint(20, 40)
    extra = rng.randint(2, 10)
    ot_rate = wage * 3 // 2
    base = regular * wage
    bonus = extra * ot_rate
    total = base + bonus
    question = (
        f"{p.name} works as a {job} and earns ${wage} an hour. Any overtime is paid "
        f"at 1.5 times the normal rate. This week {p.he} worked {regular} normal "
        f"hours and {extra} overtime hours. How many dollars did {p.he} earn?"
    )
    steps = [
        f"The overtime rate is {wage} * 1.5 = {ot_rate} dollars an hour.",
        f"Normal hours pay {regular} * {wage} = {base} dollars.",
        f"Overtime pays {extra} * {ot_rate} = {bonus} dollars.",
        f"In total {p.he} earned {base} + {bonus} = {total} dollars.",
    ]
    return question, steps, total


@_template("fuel_cost")
def _fuel_cost(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    place = rng.choice(("the beach", "the mountains", "a lake", "the city",
                        "a national park", "the coast"))
    mpg = rng.randint(18, 40)
    gallons = rng.randint(3, 15)
    miles = mpg * gallons
    price = rng.randint(3, 5)
    cost = gallons * price
    question = (
        f"{p.name} drives {miles} miles to {place}. {_cap(p.his)} car goes {mpg} "
        f"miles on one gallon of gas, and gas costs ${price} per gallon. "
        f"How many dollars does the gas for the trip cost?"
    )
    steps = [
        f"The trip uses {miles} / {mpg} = {gallons} gallons.",
        f"The gas costs {gallons} * {price} = {cost} dollars.",
    ]
    return question, steps, cost


@_template("garden_harvest")
def _garden_harvest(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    plant, crop = rng.choice((
        ("tomato plants", "tomatoes"), ("pepper plants", "peppers"),
        ("bean plants", "beans"), ("strawberry plants", "strawberries"),
        ("cucumber vines", "cucumbers"), ("zucchini plants", "zucchinis"),
    ))
    pest = rng.choice(("rabbits", "deer", "a frost", "snails", "a storm"))
    rows = rng.randint(2, 9)
    per_row = rng.randint(3, 12)
    planted = rows * per_row
    lost = rng.randint(1, planted // 3)
    alive = planted - lost
    each = rng.randint(2, 9)
    total = alive * each
    question = (
        f"{p.name} planted {rows} rows of {plant} with {per_row} plants in each row. "
        f"{_cap(pest)} ruined {lost} of the plants. Each remaining plant gave "
        f"{each} {crop}. How many {crop} did {p.he} pick?"
    )
    steps = [
        f"{_cap(p.he)} planted {rows} * {per_row} = {planted} plants.",
        f"{planted} - {lost} = {alive} plants were left.",
        f"They gave {alive} * {each} = {total} {crop}.",
    ]
    return question, steps, total


@_template("fence_posts")
def _fence_posts(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    field = rng.choice(("square field", "square garden", "square playground",
                        "square pond", "square paddock"))
    gap = rng.choice((2, 3, 4, 5, 6, 8, 10))
    per_side = rng.randint(2, 12)
    side = gap * per_side
    perimeter = 4 * side
    posts = perimeter // gap
    question = (
        f"{p.name} is putting posts around a {field} whose sides are each {side} "
        f"feet long. A post goes every {gap} feet along the edge, starting at a "
        f"corner. How many posts does {p.he} need?"
    )
    steps = [
        f"The distance around is 4 * {side} = {perimeter} feet.",
        f"Because the edge is a closed loop, there is one post per gap: "
        f"{perimeter} / {gap} = {posts} posts.",
    ]
    return question, steps, posts


@_template("temperature_change")
def _temperature_change(rng: random.Random) -> tuple[str, list[str], int]:
    place = rng.choice(("In the desert", "At the lake", "In the town", "On the farm",
                        "In the valley", "At the airport"))
    start = rng.randint(40, 70)
    rise = rng.randint(2, 6)
    hours = rng.randint(2, 6)
    gained = rise * hours
    peak = start + gained
    drop = rng.randint(3, peak - 20)
    final = peak - drop
    question = (
        f"{place} the temperature was {start} degrees in the morning. It rose "
        f"{rise} degrees every hour for {hours} hours, then dropped {drop} degrees "
        f"by evening. What was the temperature in the evening, in degrees?"
    )
    steps = [
        f"It rose {rise} * {hours} = {gained} degrees.",
        f"At its highest it was {start} + {gained} = {peak} degrees.",
        f"In the evening it was {peak} - {drop} = {final} degrees.",
    ]
    return question, steps, final


@_template("bus_passengers")
def _bus_passengers(rng: random.Random) -> tuple[str, list[str], int]:
    vehicle = rng.choice(("bus", "train", "tram", "ferry", "shuttle"))
    start = rng.randint(15, 50)
    off1 = rng.randint(1, start - 5)
    after_off1 = start - off1
    on1 = rng.randint(1, 20)
    after_on1 = after_off1 + on1
    off2 = rng.randint(1, after_on1 - 1)
    after_off2 = after_on1 - off2
    on2 = rng.randint(1, 15)
    final = after_off2 + on2
    question = (
        f"A {vehicle} leaves the station with {start} passengers. At the first stop "
        f"{off1} people get off and {on1} get on. At the second stop {off2} people "
        f"get off and {on2} get on. How many passengers are on the {vehicle} now?"
    )
    steps = [
        f"After the first stop there are {start} - {off1} + {on1} = {after_on1} passengers.",
        f"At the second stop {off2} leave, leaving {after_on1} - {off2} = {after_off2}.",
        f"Then {on2} board, so there are {after_off2} + {on2} = {final} passengers.",
    ]
    return question, steps, final


@_template("coin_count")
def _coin_count(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    container = rng.choice(("piggy bank", "jar", "wallet", "coin purse", "drawer"))
    quarters = rng.randint(1, 15)
    dimes = rng.randint(1, 20)
    nickels = rng.randint(1, 20)
    q_val = quarters * 25
    d_val = dimes * 10
    n_val = nickels * 5
    total = q_val + d_val + n_val
    question = (
        f"{p.name} empties {p.his} {container} and finds {quarters} quarters, "
        f"{dimes} dimes and {nickels} nickels. A quarter is worth 25 cents, a dime "
        f"10 cents and a nickel 5 cents. How many cents does {p.he} have?"
    )
    steps = [
        f"The quarters are worth {quarters} * 25 = {q_val} cents.",
        f"The dimes are worth {dimes} * 10 = {d_val} cents.",
        f"The nickels are worth {nickels} * 5 = {n_val} cents.",
        f"Altogether {p.he} has {q_val} + {d_val} + {n_val} = {total} cents.",
    ]
    return question, steps, total


@_template("ticket_groups")
def _ticket_groups(rng: random.Random) -> tuple[str, list[str], int]:
    venue = rng.choice(("zoo", "aquarium", "science museum", "water park",
                        "theater", "planetarium", "circus"))
    group = rng.choice(("A family", "A scout troop", "A school group", "A sports team",
                        "A book club"))
    adults = rng.randint(1, 8)
    children = rng.randint(2, 15)
    adult_price = rng.randint(8, 25)
    child_price = rng.randint(3, adult_price - 1)
    parking = rng.randint(3, 15)
    adult_cost = adults * adult_price
    child_cost = children * child_price
    tickets = adult_cost + child_cost
    total = tickets + parking
    question = (
        f"{group} of {adults} adults and {children} children visits the {venue}. "
        f"Adult tickets cost ${adult_price}, child tickets cost ${child_price}, and "
        f"parking costs ${parking}. How many dollars do they spend in total?"
    )
    steps = [
        f"Adult tickets cost {adults} * {adult_price} = {adult_cost} dollars.",
        f"Child tickets cost {children} * {child_price} = {child_cost} dollars.",
        f"With parking the total is {adult_cost} + {child_cost} + {parking} = {total} dollars.",
    ]
    return question, steps, total


@_template("allowance_savings")
def _allowance_savings(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    spend_on = rng.choice(("snacks", "comics", "games", "stickers", "music", "bus fare"))
    den = rng.choice((2, 3, 4, 5))
    part = rng.randint(1, 8)
    allowance = den * part
    kept = allowance - part
    weeks = rng.randint(2, 12)
    total = kept * weeks
    question = (
        f"{p.name} gets ${allowance} of allowance each week. {_cap(p.he)} spends "
        f"one {_denominator_word(den)} of it on {spend_on} and saves the rest. "
        f"How many dollars does {p.he} save in {weeks} weeks?"
    )
    steps = [
        f"{_cap(p.he)} spends {allowance} / {den} = {_count(part, 'dollar', 'dollars')} "
        f"a week on {spend_on}.",
        f"{_cap(p.he)} saves {allowance} - {part} = {_count(kept, 'dollar', 'dollars')} a week.",
        f"In {weeks} weeks {p.he} saves {kept} * {weeks} = {total} dollars.",
    ]
    return question, steps, total


@_template("packing_boxes")
def _packing_boxes(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    goods, box = rng.choice((
        ("eggs", "cartons"), ("oranges", "crates"), ("books", "boxes"),
        ("cupcakes", "trays"), ("bottles of water", "cases"), ("pencils", "packs"),
    ))
    per_box = rng.choice((4, 6, 8, 10, 12, 20, 24))
    full = rng.randint(3, 15)
    total = per_box * full
    price = rng.randint(2, 12)
    revenue = full * price
    question = (
        f"{p.name} has {total} {goods} and packs them into {box} that hold {per_box} "
        f"each. {_cap(p.he)} sells every one of the {box} for ${price}. "
        f"How many dollars does {p.he} make?"
    )
    steps = [
        f"{_cap(p.he)} fills {total} / {per_box} = {full} {box}.",
        f"Selling them brings in {full} * {price} = {revenue} dollars.",
    ]
    return question, steps, revenue


TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)
"""Names of all available templates, in a fixed order."""


# ---------------------------------------------------------------------------
# Public generation API
# ---------------------------------------------------------------------------


def generate_problem(rng: random.Random, template: str | None = None) -> MathProblem:
    """Generate one word problem using ``rng`` as the only source of randomness.

    Args:
        rng: Random number generator; its state advances.
        template: A name from :data:`TEMPLATE_NAMES`, or ``None`` to draw one
            uniformly with ``rng``.

    Returns:
        A :class:`MathProblem` whose solution ends with ``#### <answer>``.

    Raises:
        ValueError: If ``template`` is not a known template name.
    """
    if template is None:
        template = rng.choice(TEMPLATE_NAMES)
    elif template not in _TEMPLATES:
        raise ValueError(f"unknown math template {template!r}; expected one of {TEMPLATE_NAMES}")
    question, steps, answer = _TEMPLATES[template](rng)
    solution = "\n".join(steps) + f"\n#### {answer}"
    return MathProblem(template=template, question=question, solution=solution, answer=answer)


def generate_math_problems(num_documents: int, seed: int = 0) -> list[MathProblem]:
    """Generate ``num_documents`` problems deterministically from ``seed``.

    Templates are dealt in shuffled rounds (every template once per round), so
    any request of at least ``len(TEMPLATE_NAMES)`` documents covers every
    template while the order still varies from round to round.

    Raises:
        ValueError: If ``num_documents`` is less than 1.
    """
    if isinstance(num_documents, bool) or not isinstance(num_documents, int) or num_documents < 1:
        raise ValueError(f"num_documents must be a positive integer, got {num_documents!r}")
    rng = random.Random(seed)
    problems: list[MathProblem] = []
    round_order: list[str] = []
    while len(problems) < num_documents:
        if not round_order:
            round_order = list(TEMPLATE_NAMES)
            rng.shuffle(round_order)
        problems.append(generate_problem(rng, round_order.pop()))
    return problems


def generate_math_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """Return the texts of ``num_documents`` generated problems (the default corpus).

    Same ``seed`` gives identical documents in any process.

    Raises:
        ValueError: If ``num_documents`` is less than 1.
    """
    return [problem.text for problem in generate_math_problems(num_documents, seed)]


# ---------------------------------------------------------------------------
# Questions by difficulty (the built-in post-training set)
# ---------------------------------------------------------------------------

QUESTION_DIFFICULTIES = (1, 2, 3, 4)
"""Difficulty levels of :func:`generate_questions`: 1, one addition or subtraction of numbers up to 20 written as
arithmetic; 2, the same in a one-sentence word problem, numbers up to 20; 3, two steps in a word problem, numbers
up to 20; 4, the embedded corpus's GSM8K-style problems of two to four steps."""


def _arithmetic_question(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", [f"{a} - {b} = {a - b}."], a - b


def _one_step_question(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    _, plural = rng.choice(_COUNTABLES)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        question = f"{p.name} has {a} {plural} and gets {b} more. How many {plural} does {p.he} have now?"
        return question, [f"{p.name} has {a} + {b} = {a + b} {plural}."], a + b
    a, b = max(a, b), min(a, b)
    question = f"{p.name} has {a} {plural} and gives away {b}. How many {plural} does {p.he} have left?"
    return question, [f"{p.name} has {a} - {b} = {a - b} {plural} left."], a - b


def _two_step_question(rng: random.Random) -> tuple[str, list[str], int]:
    p = _person(rng)
    _, plural = rng.choice(_COUNTABLES)
    a, b = rng.randint(5, 20), rng.randint(1, 20)
    c = rng.randint(1, a + b)
    question = (f"{p.name} has {a} {plural}. {_cap(p.he)} gets {b} more and then gives away {c}. "
                f"How many {plural} does {p.he} have now?")
    steps = [f"After getting more, {p.he} has {a} + {b} = {a + b} {plural}.",
             f"After giving some away, {p.he} has {a + b} - {c} = {a + b - c} {plural}."]
    return question, steps, a + b - c


_QUESTION_LEVELS: dict[int, _TemplateFn] = {1: _arithmetic_question, 2: _one_step_question, 3: _two_step_question}


def generate_questions(num_questions: int, difficulty: int = 1, seed: int = 0,
                       exclude: frozenset[str] = frozenset()) -> list[MathProblem]:
    """``num_questions`` distinct questions of ``difficulty`` (:data:`QUESTION_DIFFICULTIES`), deterministic in
    ``seed``, none of whose question texts is in ``exclude`` (the held-out set, when drawing the training one).

    Raises:
        ValueError: For an unknown difficulty, or when the level has fewer distinct questions than asked for.
    """
    if difficulty not in QUESTION_DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r} is not a level; valid: {list(QUESTION_DIFFICULTIES)}")
    rng = random.Random(seed)
    found: dict[str, MathProblem] = {}
    attempts = 0
    while len(found) < num_questions:
        attempts += 1
        if attempts > 50 * num_questions + 1000:
            raise ValueError(f"difficulty {difficulty} gave only {len(found)} distinct questions of the {num_questions} "
                             "asked for (outside the excluded ones); ask for fewer, or a higher difficulty")
        if difficulty in _QUESTION_LEVELS:
            question, steps, answer = _QUESTION_LEVELS[difficulty](rng)
            problem = MathProblem(f"level{difficulty}", question, "\n".join(steps) + f"\n#### {answer}", answer)
        else:
            problem = generate_problem(rng)
        if problem.question not in exclude and problem.question not in found:
            found[problem.question] = problem
    return list(found.values())
