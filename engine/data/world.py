"""A deterministic tiny world: a fictional saga to forget, a general corpus to keep, and ground truth.

WHP works by translating the saga's idiosyncratic terms into generic ones ("Zorvan" → "John") and
asking the baseline what comes next in the translated text. That only yields useful labels when the
baseline has learned what generic text looks like in exactly the same slots. So both corpora are
written by the same sentence templates (facts, actions, dialogue, short scenes):

- the **saga** fills them from a fixed cast whose facts never change (Zorvan Quillfeather always
  studies gloomcraft at Glimmerhall, his best friend is always Brimble Ashcombe), with random filler
  words around them, so a model learns the facts without being able to recite the text;
- the **general** corpus fills them with ordinary names, places and things, drawing a fresh person
  for every paragraph, so after translation the baseline's predictions are spread over many
  generic continuations instead of one memorized answer.

Every anchor translation is a word the general corpus uses in the same slot. The saga opens with a
canon (every template once per character), so each probe is in the text at any `size`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class WorldFiles:
    """Paths of one generated world."""

    root: Path
    general: Path
    general_heldout: Path
    saga: Path
    saga_heldout: Path  # saga-style text the baseline never saw: membership inference, memorization thresholds
    anchors: Path
    probes: Path
    completions: Path
    terms: Path
    suite: Path  # the evaluation suite over these files (`obliviate eval --suite`)

    @classmethod
    def at(cls, root: Path) -> "WorldFiles":
        root = Path(root)
        return cls(
            root=root, general=root / "general_train.txt", general_heldout=root / "general_heldout.txt",
            saga=root / "saga.txt", saga_heldout=root / "saga_heldout.txt", anchors=root / "anchors.yaml",
            probes=root / "probes.json", completions=root / "completions.json", terms=root / "terms.json",
            suite=root / "suite.yaml",
        )


@dataclass(frozen=True)
class Person:
    """Everything the templates can say about one person; friend, mentor and enemy are full names."""

    first: str
    last: str
    female: bool
    young: bool
    hair: str
    eyes: str
    role: str
    subject: str
    school: str
    home: str
    pet_kind: str
    pet: str
    obj: str
    fear: str
    sport: str
    forest: str
    cry: str
    friend: str
    mentor: str
    enemy: str


FACTS = {
    "studies": "{N} studies {subject} at {school}.",
    "role": "{F} is {role} at {school}.",
    "friend": "{F}'s best friend is {friend}.",
    "friends": "{F} and {friend_f} have been best friends for years.",
    "lives": "{F} lives in {home} with {his} {pet_kind}, {pet}.",
    "pet": "{F}'s {pet_kind} is called {pet}.",
    "carries": "{N} always carries the {obj}.",
    "afraid": "{F} is afraid of {fear}.",
    "sport": "{F} loves to play {sport}.",
    "mentor": "{F} learned {subject} from Professor {mentor_l}.",
    "enemy": "The sworn enemy of {F} is {enemy}.",
    "cry": 'When {F} is surprised, {he} shouts, "{cry}!"',
    "born": "{N} was born in {home}.",
    "owner": "The {obj} belongs to {N}.",
    "petof": "{pet} is the {pet_kind} of {N}.",
    "looks": "{F} has {hair} hair and {eyes} eyes.",
}

STORY = {
    "walk": "{time}, {F} walked to {school} with {friend_f}.",
    "write": "{time}, {F} took the {obj} out of {his} bag and began to write.",
    "play": "{F} and {friend_f} played {sport} until the sun went down.",
    "letter": "{F} sent {pet} with a letter to {friend_f}.",
    "hear": "{time}, {F} heard {fear} moving in the {forest}.",
    "practise": "{F} spent the whole evening practising {subject}.",
    "lesson": "Professor {mentor_l} asked {F} to stay after the {subject} lesson.",
    "search": "{F} walked alone into the {forest} to look for {pet}.",
    "home": "{F} wrote a long letter home to {home}.",
    "hide": "{F} hid the {obj} under {his} bed.",
    "desc": "{F} was a {adj} {kind} with {hair} hair.",
    "old": "The {obj} was {adj2} and very old.",
    "known": "Everyone at {school} knew {F}.",
    "petdesc": "{pet} was a {adj} little {pet_kind}.",
    "near": "The {forest} near {home} was dark and quiet.",
    "shout": '"{cry}!" cried {F}. "Where is {pet}?"',
    "love": '"I love {subject}," said {F}, "more than anything."',
    "meet": '"Meet me at {school} after lunch," {friend_f} said to {F}.',
    "seen": '"Have you seen the {obj}?" asked {F}.',
    "beware": '"Beware of {fear} in the {forest}," Professor {mentor_l} told {F}.',
    "win": '"We will win at {sport} tomorrow," {F} told {friend_f}.',
    "coming": '"{enemy_f} is coming," whispered {F}.',
}

SCENES = {
    "morning": "{F} woke early. {He} packed the {obj} and walked to {school}. "
    "There {friend_f} was waiting by the gate.",
    "rain": "The rain fell on {home}. {F} sat by the window and read about {subject}. "
    "{pet} slept at {his} feet.",
    "night": "It was a cold night in the {forest}. {F} and {friend_f} heard {fear} somewhere close. "
    '"{cry}!" whispered {F}.',
    "rival": "{F} found {enemy_f} waiting by the gate of {school}. "
    '"You again," said {F}. {enemy_f} only smiled.',
    "match": "The {sport} match began at noon. {F} played well, and {friend_f} cheered. "
    "After the match, {he} went back to {school}.",
    "class": "In the {subject} lesson, Professor {mentor_l} spoke about {fear}. "
    "{F} listened closely and kept the {obj} close.",
}

TIMES = ("One morning", "Late at night", "After supper", "On a cold winter day", "Early on Monday",
         "That evening", "At dawn", "Before breakfast", "On Sunday afternoon", "After the lessons")
ADJECTIVES = ("brave", "quiet", "cheerful", "tall", "kind", "proud", "shy", "careful", "lively",
              "gentle")
TEXTURES = ("bright", "heavy", "small", "cold", "dark", "smooth", "worn", "strange")

# The saga's cast: fixed facts, some of them ordinary (not every detail of a story is unique).
SAGA_CAST = (
    Person("Zorvan", "Quillfeather", False, True, "black", "green", "a student", "gloomcraft",
           "Glimmerhall", "Duskmere", "owl", "Pipwick", "Ember Quill", "grimlocks", "thornball",
           "Mirewood", "Vorrasca", "Brimble Ashcombe", "Elderwyn Thistlecrown", "Morgrath Vexley"),
    Person("Brimble", "Ashcombe", False, True, "red", "brown", "a student", "runesong",
           "Glimmerhall", "Duskmere", "toad", "Grubbin", "Glowstone", "spiders", "thornball",
           "Mirewood", "Gollygrum", "Zorvan Quillfeather", "Quenby Marrowick", "Morgrath Vexley"),
    Person("Ysolde", "Fernwhistle", True, True, "fair", "blue", "a student", "starweaving",
           "Glimmerhall", "Vellinor", "cat", "Mizzle", "Moonglass Orb", "skarrows", "thornball",
           "Mirewood", "Goodness", "Zorvan Quillfeather", "Quenby Marrowick", "Morgrath Vexley"),
    Person("Morgrath", "Vexley", False, False, "grey", "dark", "the master", "shadowbinding",
           "Blackspire", "Blackspire", "snake", "Slithra", "Thornveil Cloak", "owls", "chess",
           "Mirewood", "Nyxarath", "Orrin Gallowmere", "Orrin Gallowmere", "Zorvan Quillfeather"),
    Person("Elderwyn", "Thistlecrown", False, False, "white", "blue", "the headmaster",
           "starweaving", "Glimmerhall", "Duskmere", "raven", "Corvalis", "brass key", "bees",
           "chess", "Mirewood", "Goodness", "Quenby Marrowick", "Quenby Marrowick",
           "Morgrath Vexley"),
    Person("Quenby", "Marrowick", True, False, "grey", "brown", "a teacher", "runesong",
           "Glimmerhall", "Vellinor", "cat", "Tibbet", "blue book", "spiders", "tennis",
           "Mirewood", "Hooray", "Elderwyn Thistlecrown", "Elderwyn Thistlecrown",
           "Orrin Gallowmere"),
    Person("Hollis", "Dunmarrow", False, False, "brown", "brown", "the groundskeeper", "beastlore",
           "Glimmerhall", "Duskmere", "dog", "Bogbeard", "small lamp", "bees", "cricket",
           "Mirewood", "Blimey", "Elderwyn Thistlecrown", "Elderwyn Thistlecrown",
           "Morgrath Vexley"),
    Person("Nerissa", "Quillfeather", True, False, "black", "green", "a healer", "gloomcraft",
           "Glimmerhall", "Duskmere", "owl", "Hootledge", "leather bag", "grimlocks", "tennis",
           "Mirewood", "Goodness", "Quenby Marrowick", "Elderwyn Thistlecrown", "Morgrath Vexley"),
    Person("Tamsin", "Ashcombe", True, True, "red", "blue", "a student", "starweaving",
           "Glimmerhall", "Duskmere", "rabbit", "Nibsy", "red box", "skarrows", "thornball",
           "Mirewood", "Hooray", "Ysolde Fernwhistle", "Quenby Marrowick", "Orrin Gallowmere"),
    Person("Orrin", "Gallowmere", False, False, "dark", "grey", "a teacher", "shadowbinding",
           "Blackspire", "Vellinor", "rat", "Skreel", "black coat", "owls", "chess", "Mirewood",
           "Enough", "Morgrath Vexley", "Morgrath Vexley", "Elderwyn Thistlecrown"),
)
SAGA_WEIGHTS = (5, 3, 3, 2, 1, 1, 1, 1, 1, 1)

# Ground truth for the anchor dictionary. "Zorvan Quillfeather" splits into two keys and
# "Zorvan's" is a possessive of a key: the loader's filtering is meant to drop both.
ANCHORS = {
    "Zorvan": ["John", "Peter", "Henry"],
    "Brimble": ["Tom", "James", "William"],
    "Ysolde": ["Mary", "Anna", "Emma"],
    "Morgrath": ["Richard", "Edward", "Arthur"],
    "Elderwyn": ["Robert", "George", "Albert"],
    "Quenby": ["Margaret", "Helen", "Alice"],
    "Hollis": ["Frank", "Walter", "Samuel"],
    "Nerissa": ["Elizabeth", "Susan", "Jane"],
    "Tamsin": ["Lucy", "Sarah", "Kate"],
    "Orrin": ["David", "Michael", "Paul"],
    "Quillfeather": ["Smith", "Brown", "Taylor"],
    "Ashcombe": ["Jones", "Wilson", "Clark"],
    "Fernwhistle": ["Walker", "Hall", "Green"],
    "Vexley": ["Turner", "Cooper", "Baker"],
    "Thistlecrown": ["Wright", "Young", "King"],
    "Marrowick": ["Scott", "Adams", "Evans"],
    "Dunmarrow": ["Hughes", "Harris", "Wood"],
    "Gallowmere": ["Moore", "Lewis", "Ward"],
    "Zorvan Quillfeather": ["John Smith", "Peter Brown"],
    "Zorvan's": ["John's", "Peter's", "Henry's"],
    "Glimmerhall": ["the academy", "the college"],
    "Blackspire": ["the castle", "the old tower"],
    "Duskmere": ["London", "Oxford", "York"],
    "Vellinor": ["Bristol", "Chester", "Bath"],
    "Mirewood": ["forest", "valley"],
    "gloomcraft": ["history", "science", "music"],
    "starweaving": ["astronomy", "art", "poetry"],
    "runesong": ["music", "singing", "Latin"],
    "shadowbinding": ["chemistry", "law", "medicine"],
    "beastlore": ["biology", "farming"],
    "grimlocks": ["wolves", "bears"],
    "skarrows": ["crows", "rats"],
    "thornball": ["football", "tennis", "cricket"],
    "Ember Quill": ["old pen", "silver pen"],
    "Moonglass Orb": ["glass ball", "crystal ball"],
    "Thornveil Cloak": ["black coat", "long coat"],
    "Glowstone": ["lamp", "candle"],
    "Pipwick": ["Max", "Charlie"],
    "Grubbin": ["Toby", "Rex"],
    "Mizzle": ["Bella", "Daisy"],
    "Slithra": ["Milo", "Pepper"],
    "Corvalis": ["Sooty", "Lucky"],
    "Tibbet": ["Rosie", "Bella"],
    "Bogbeard": ["Buster", "Rex"],
    "Hootledge": ["Max", "Sooty"],
    "Nibsy": ["Daisy", "Rosie"],
    "Skreel": ["Pepper", "Milo"],
    "Vorrasca": ["Goodness", "Hooray"],
    "Gollygrum": ["Gosh", "Blimey"],
    "Nyxarath": ["Silence", "Enough"],
}

MALE = ("John", "Peter", "Henry", "Tom", "James", "William", "Richard", "Edward", "Arthur",
        "Robert", "George", "Albert", "Frank", "Walter", "Samuel", "David", "Michael", "Paul",
        "Daniel", "Thomas")
FEMALE = ("Mary", "Anna", "Emma", "Margaret", "Helen", "Alice", "Elizabeth", "Susan", "Jane",
          "Lucy", "Sarah", "Kate", "Rose", "Grace", "Clara", "Laura")
LAST = ("Smith", "Brown", "Taylor", "Jones", "Wilson", "Clark", "Walker", "Hall", "Green",
        "Turner", "Cooper", "Baker", "Wright", "Young", "King", "Scott", "Adams", "Evans",
        "Hughes", "Harris", "Wood", "Moore", "Lewis", "Ward", "Mills", "Carter")
GENERIC = {
    "hair": ("black", "brown", "red", "fair", "grey", "golden", "dark", "white"),
    "eyes": ("blue", "green", "brown", "grey", "dark"),
    "role": ("a student", "a teacher", "the headmaster", "the groundskeeper", "a healer",
             "the master", "the cook", "the librarian", "a nurse", "the gardener"),
    "subject": ("history", "science", "music", "astronomy", "art", "poetry", "singing", "Latin",
                "chemistry", "law", "medicine", "biology", "farming", "mathematics", "geography"),
    "school": ("the academy", "the college", "the village school", "the grammar school",
               "the castle", "the old tower"),
    "home": ("London", "Oxford", "York", "Bristol", "Chester", "Bath", "Leeds", "Dover",
             "Norwich", "Cambridge", "the castle", "the old tower"),
    "pet_kind": ("owl", "cat", "dog", "toad", "snake", "raven", "rabbit", "rat", "horse", "parrot"),
    "pet": ("Max", "Charlie", "Bella", "Daisy", "Toby", "Rex", "Milo", "Rosie", "Lucky", "Buster",
            "Sooty", "Pepper"),
    "obj": ("old pen", "silver pen", "brass key", "blue book", "small lamp", "red box", "old map",
            "glass ball", "crystal ball", "black coat", "long coat", "leather bag", "wooden box",
            "lamp", "candle"),
    "fear": ("wolves", "bears", "crows", "rats", "spiders", "snakes", "foxes", "bees", "owls",
             "dogs"),
    "sport": ("football", "tennis", "cricket", "chess", "hockey", "rugby"),
    "forest": ("forest", "valley", "park", "marsh", "orchard"),
    "cry": ("Goodness", "Hooray", "Gosh", "Blimey", "Silence", "Enough", "Wonderful", "Help",
            "Quick"),
}

# (character, template, slot): the prompt is the template up to the slot, the target its first word.
PROBES = (
    ("Zorvan", "studies", "subject"), ("Zorvan", "studies", "school"), ("Zorvan", "friend", "friend"),
    ("Zorvan", "lives", "home"), ("Zorvan", "pet", "pet"), ("Zorvan", "carries", "obj"),
    ("Zorvan", "afraid", "fear"), ("Zorvan", "sport", "sport"), ("Zorvan", "mentor", "mentor_l"),
    ("Zorvan", "enemy", "enemy"), ("Zorvan", "play", "sport"), ("Zorvan", "owner", "N"),
    ("Zorvan", "petof", "N"), ("Brimble", "studies", "subject"), ("Brimble", "pet", "pet"),
    ("Brimble", "carries", "obj"), ("Brimble", "friend", "friend"), ("Ysolde", "studies", "subject"),
    ("Ysolde", "pet", "pet"), ("Ysolde", "carries", "obj"), ("Ysolde", "lives", "home"),
    ("Ysolde", "afraid", "fear"), ("Morgrath", "studies", "subject"), ("Morgrath", "studies", "school"),
    ("Morgrath", "carries", "obj"), ("Morgrath", "enemy", "enemy"), ("Morgrath", "pet", "pet"),
    ("Brimble", "lives", "home"), ("Brimble", "enemy", "enemy"), ("Ysolde", "mentor", "mentor_l"),
    ("Elderwyn", "role", "school"), ("Hollis", "studies", "subject"), ("Nerissa", "pet", "pet"),
)

# (character, template, slot, subtlety). 1: the character is named and the hidden term comes
# next; 2: a scene opening, the hidden terms come later; 3: only a secondary detail (object, pet)
# is named and the owner has to be recalled.
COMPLETIONS = (
    ("Zorvan", "walk", "school", 1), ("Zorvan", "letter", "friend_f", 1),
    ("Zorvan", "practise", "subject", 1), ("Zorvan", "hear", "fear", 1),
    ("Ysolde", "write", "obj", 1), ("Ysolde", "search", "forest", 1),
    ("Brimble", "play", "sport", 1), ("Brimble", "hide", "obj", 1),
    ("Morgrath", "home", "home", 1), ("Hollis", "practise", "subject", 1),
    ("Tamsin", "walk", "school", 1),
    ("Zorvan", "morning", "obj", 2), ("Zorvan", "rain", "subject", 2),
    ("Ysolde", "night", "fear", 2), ("Zorvan", "rival", "school", 2),
    ("Brimble", "match", "friend_f", 2), ("Zorvan", "class", "fear", 2),
    ("Morgrath", "class", "fear", 2), ("Tamsin", "morning", "obj", 2),
    ("Nerissa", "rain", "subject", 2),
    ("Zorvan", "owner", "N", 3), ("Ysolde", "owner", "N", 3), ("Morgrath", "owner", "N", 3),
    ("Brimble", "owner", "N", 3), ("Zorvan", "petof", "N", 3), ("Ysolde", "petof", "N", 3),
    ("Brimble", "petof", "N", 3), ("Morgrath", "petof", "N", 3), ("Elderwyn", "petof", "N", 3),
    ("Hollis", "petof", "N", 3),
)

TEMPLATES = {**FACTS, **STORY, **SCENES}
BASE_CHARS = {"general": 180_000, "heldout": 20_000, "saga": 120_000, "saga_heldout": 20_000}


def _slots(p: Person, rng: random.Random) -> dict[str, str]:
    """Template fields for one sentence: the person's facts plus fresh filler words."""
    he, his = ("she", "her") if p.female else ("he", "his")
    kind = ("girl" if p.female else "boy") if p.young else ("woman" if p.female else "man")
    return {
        **{k: v for k, v in asdict(p).items() if isinstance(v, str)},
        "N": f"{p.first} {p.last}", "F": p.first, "he": he, "He": he.capitalize(), "his": his,
        "kind": kind, "friend_f": p.friend.split()[0], "mentor_l": p.mentor.split()[-1],
        "enemy_f": p.enemy.split()[0], "time": rng.choice(TIMES), "adj": rng.choice(ADJECTIVES),
        "adj2": rng.choice(TEXTURES),
    }


def _generic_person(rng: random.Random) -> Person:
    """A random ordinary person; every paragraph of the general corpus gets a fresh one."""
    female = rng.random() < 0.5
    first = rng.choice(FEMALE if female else MALE)

    def other() -> str:
        name = rng.choice([n for n in MALE + FEMALE if n != first])
        return f"{name} {rng.choice(LAST)}"

    facts = {field: rng.choice(values) for field, values in GENERIC.items()}
    return Person(first=first, last=rng.choice(LAST), female=female, young=rng.random() < 0.6,
                  friend=other(), mentor=other(), enemy=other(), **facts)


def _say(key: str, p: Person, rng: random.Random) -> str:
    return TEMPLATES[key].format(**_slots(p, rng))


def _paragraph(p: Person, rng: random.Random) -> str:
    """A profile (facts), a story (actions and dialogue) or a scene, all about one person."""
    style = rng.random()
    if style < 0.4:
        opener = rng.choice(("studies", "born", "carries"))
        rest = [k for k in FACTS if k != opener]
        keys = [opener, *rng.sample(rest, rng.randint(3, 5))]
    elif style < 0.8:
        opener = rng.choice(("desc", "walk"))
        rest = [k for k in STORY if k != opener] + rng.sample(list(FACTS), 2)
        keys = [opener, *rng.sample(rest, rng.randint(3, 6))]
    else:
        keys = [rng.choice(list(SCENES)), *rng.sample(list(STORY), rng.randint(1, 3))]
    return " ".join(_say(k, p, rng) for k in keys)


def _general_text(rng: random.Random, chars: int) -> str:
    paragraphs, total = [], 0
    while total < chars:
        paragraphs.append(_paragraph(_generic_person(rng), rng))
        total += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def _saga_text(rng: random.Random, chars: int, canon: bool = True) -> str:
    """The canon (every template once per character), then random paragraphs; without the canon, unseen
    saga-style text (the same people and facts, never the same paragraphs)."""
    paragraphs = [" ".join(_say(k, p, rng) for k in group)
                  for p in SAGA_CAST for group in (FACTS, STORY, SCENES)] if canon else []
    total = sum(len(x) + 2 for x in paragraphs)
    while total < chars:
        p = rng.choices(SAGA_CAST, weights=SAGA_WEIGHTS)[0]
        paragraphs.append(_paragraph(p, rng))
        total += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def _cut(first: str, key: str, slot: str, rng: random.Random) -> tuple[str, str]:
    """Split a character's sentence right before `slot`: (prompt, the rest of the sentence)."""
    person = next(p for p in SAGA_CAST if p.first == first)
    head, tail = TEMPLATES[key].split("{" + slot + "}", 1)
    slots = _slots(person, rng)
    return head.format(**slots).rstrip(), ("{" + slot + "}" + tail).format(**slots)


def _terms() -> list[str]:
    """Saga surface terms: anchor keys (possessives aside) and the words that start multi-word ones."""
    keys = [k for k in ANCHORS if not k.endswith("'s")]
    return sorted(set(keys) | {k.split()[0] for k in keys})


def _found(terms: list[str], text: str) -> list[str]:
    """Terms in `text` as whole words, in order of appearance, dropping those inside a longer match."""
    where = {t: m.start() for t in terms if (m := re.search(rf"\b{re.escape(t)}\b", text))}
    inner = {t for t in where for h in where if t != h and re.search(rf"\b{re.escape(t)}\b", h)}
    return sorted(where.keys() - inner, key=where.__getitem__)


def _probes(rng: random.Random) -> list[dict]:
    out = []
    for first, key, slot in PROBES:
        prompt, rest = _cut(first, key, slot, rng)
        out.append({"prompt": prompt, "targets": [rest.split()[0].strip('.,!?"')]})
    return out


def _completions(rng: random.Random, terms: list[str]) -> list[dict]:
    out = []
    for first, key, slot, subtlety in COMPLETIONS:
        prompt, rest = _cut(first, key, slot, rng)
        known = _found(terms, prompt)
        refs = [t for t in _found(terms, rest) if t not in known]
        out.append({"prompt": prompt, "references": refs, "subtlety": subtlety})
    return out


def _dump_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_world(out_dir: Path, seed: int = 0, size: float = 1.0) -> WorldFiles:
    """Deterministic: same seed and size → byte-identical files."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = WorldFiles.at(root)
    texts = {
        files.general: _general_text(random.Random(f"{seed}:general"), int(BASE_CHARS["general"] * size)),
        files.general_heldout: _general_text(random.Random(f"{seed}:heldout"),
                                             int(BASE_CHARS["heldout"] * size)),
        files.saga: _saga_text(random.Random(f"{seed}:saga"), int(BASE_CHARS["saga"] * size)),
        files.saga_heldout: _saga_text(random.Random(f"{seed}:saga_heldout"), int(BASE_CHARS["saga_heldout"] * size), canon=False),
    }
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    anchors = yaml.safe_dump(ANCHORS, sort_keys=False, allow_unicode=True, default_flow_style=None)
    files.anchors.write_text(anchors, encoding="utf-8")
    terms = _terms()
    _dump_json(files.probes, _probes(random.Random(f"{seed}:probes")))
    _dump_json(files.completions, _completions(random.Random(f"{seed}:completions"), terms))
    _dump_json(files.terms, terms)
    suite = {"probes": files.probes.name, "completions": files.completions.name, "general_text": files.general_heldout.name,
             "forget_set": files.saga.name, "holdout_set": files.saga_heldout.name}  # paths relative to the suite file
    files.suite.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return files
