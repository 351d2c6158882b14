"""Writes assets/perfusion/captions.txt: the caption list Perfusion's covariance C is computed
from by default (the uncentered covariance of the text encoder's outputs over the captions'
non-padding tokens).

The paper computes C over a large sample of LAION captions; those cannot be shipped here (their
licence is unclear and the repository cannot download them). These captions are written for this
project instead: every caption is one of the templates below filled with a subject, a place and a
style drawn from the lists below (seeded, so the file is reproducible), 1000 in all, deduplicated.
They are ours, under the repository's licence. They cover the kinds of prompts people write to SD
(objects, animals, people, scenes, styles), but they are not a web sample: for covariance
statistics closer to the paper's, give a file of your own captions (one per line) with
`--set captions=FILE`.

Run: python3 tools/make_perfusion_captions.py   (standard library only)
"""

import random
from pathlib import Path

SUBJECTS = """cat|dog|teapot|teddy bear|red car|old man|young woman|child|horse|bird|vase of flowers
|wooden chair|bicycle|lighthouse|castle|robot|owl|fox|coffee cup|backpack|guitar|sneakers|clock
|house|bridge|sailboat|mountain|forest|city street|bowl of fruit|sunflower|elephant|rabbit
|pair of glasses|leather bag|toy train|candle|book|lamp|dragon|astronaut|chef|knight|tiger
|cactus|tree|waterfall|train station|market|pizza|cake|motorcycle|penguin|duck|statue|violin
|umbrella|hat|kitten|puppy|family|cottage|tower|bus|plate of pasta|girl|boy|painter|dancer
|ship|airplane|river|field of wheat|snowman|ceramic mug|plush toy|watch|shoe|table|sofa""".split("|")
PLACES = """on a beach|in the snow|on a wooden table|in a garden|in a kitchen|on the moon
|in a city at night|in a forest|on a mountain top|in the rain|under a tree|on a shelf
|in front of the eiffel tower|in a living room|at sunset|in the desert|on a street|in a field
|next to a window|on a boat|in a museum|in the jungle|on grass|in a bathtub|at a cafe|in space
|on a bed|by a lake|in a library|on a rooftop|in the fog|at the market|in a studio""".split("|")
STYLES = """a photo|a close-up photo|a watercolor painting|an oil painting|a pencil sketch
|a cartoon|a 3d render|a vintage photograph|a black and white photo|a digital illustration
|a cubist painting|a pixel art image|an anime drawing|a high resolution photo|a blurry photo
|a low angle photo|a studio photo|a charcoal drawing|a children's book illustration|a poster""".split("|")
TEMPLATES = [
    "{style} of a {subject} {place}",
    "a {subject} {place}",
    "{style} of a {subject}",
    "a {subject} {place}, {style2}",
    "{style} of a {subject} and a {subject2} {place}",
    "a {adj} {subject} {place}",
]
ADJS = "small|large|happy|sleepy|shiny|colorful|old|tiny|fluffy|golden|wet|broken|new|cute".split("|")


def clean(xs):
    return [x.strip() for x in xs if x.strip()]


def main():
    rng = random.Random(20261205)
    subjects, places, styles = clean(SUBJECTS), clean(PLACES), clean(STYLES)
    seen, out = set(), []
    while len(out) < 1000:
        t = rng.choice(TEMPLATES)
        c = t.format(
            style=rng.choice(styles),
            style2=rng.choice(styles)[2:].lstrip("n ").strip(),
            subject=rng.choice(subjects),
            subject2=rng.choice(subjects),
            place=rng.choice(places),
            adj=rng.choice(ADJS),
        )
        if c not in seen:
            seen.add(c)
            out.append(c)
    path = Path(__file__).resolve().parent.parent / "assets" / "perfusion" / "captions.txt"
    path.write_text("\n".join(out) + "\n")
    print(f"{len(out)} captions -> {path}")


if __name__ == "__main__":
    main()
