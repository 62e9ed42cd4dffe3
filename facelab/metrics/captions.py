"""Caption consistency: which attributes a caption states, and a classifier's accuracy on them.

`stated_attributes` reads CelebA-Dialog-style sentences. Cues are matched anywhere ("smiling", "blond hair", "beard",
"eyeglasses", "bags under", "twenties", "light skin", ...); a negation (no, not, n't, never, without, ...) earlier in
the same clause (clauses end at . , ; and at "with", "and", "but") flips the cue. Gender comes from nouns and pronouns
(man/he/his vs woman/she/her) when only one side occurs. Age decides Young only for teens/twenties/"young" (1) and
forties and older/"middle-aged"/"elderly" (0): thirties states nothing. An attribute given contradictory values is
dropped.

Absence states nothing, except in the complete grammar of the synthetic `caption()` ("This man/woman is [not]
smiling ..." ... "He/She is in his/her twenties/fifties, with light/medium/dark skin."), which always names the
mouth, hair colour and bangs, a beard, every worn item and bags under the eyes when present: there, absence means 0
(No_Beard = 1), and a synthetic caption states every attribute of ATTRIBUTES plus `skin_tone` (SYNTHETIC_STATED).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from torch import Tensor

from facelab.data.synthetic import ATTRIBUTES, HAIR_COLOURS
from facelab.io.errors import InputError

SYNTHETIC_STATED = frozenset([*ATTRIBUTES, "skin_tone"])

_NEGATION = re.compile(r"\b(?:no|not|never|without|nor|neither|none)\b|n't\b")
_CLAUSE_END = re.compile(r"[.!?;,]|\b(?:with|and|but)\b")
_MALE = re.compile(r"\b(?:man|men|he|his|him|himself|gentleman|guy|boy|male)\b")
_FEMALE = re.compile(r"\b(?:woman|women|she|her|hers|herself|lady|girl|female)\b")
_HAIR_WORDS = {"Black_Hair": "black", "Blond_Hair": "blonde?", "Brown_Hair": "brown", "Gray_Hair": "gr[ae]y"}


def _binary(name: str) -> tuple[dict[str, int], dict[str, int]]:
    return {name: 1}, {name: 0}


# (cue, values when affirmed, values when negated or None: a negation leaves the cue unread)
_CUES: list[tuple[re.Pattern, dict[str, int], dict[str, int] | None]] = [
    (re.compile(p), *values) for p, *values in [
        (r"\bsmil(?:e|es|ed|ing)\b", *_binary("Smiling")),
        (r"\bmouth (?:is )?(?:slightly |a little |partly )?open\b|\bopen mouth\b", *_binary("Mouth_Slightly_Open")),
        *[(rf"\b{word}[- ]hair(?:ed)?\b", {h: int(h == name) for h in HAIR_COLOURS}, {name: 0})
          for name, word in _HAIR_WORDS.items()],
        (r"\bbangs\b|\bfringe\b", *_binary("Bangs")),
        (r"\b(?:beard|mustache|moustache|goatee|stubble)\b", {"No_Beard": 0}, {"No_Beard": 1}),
        (r"\bclean[- ]shaven\b", {"No_Beard": 1}, {"No_Beard": 0}),
        (r"\b(?:eye|sun)?glasses\b|\bspectacles\b", *_binary("Eyeglasses")),
        (r"\blipstick\b", *_binary("Wearing_Lipstick")),
        (r"\b(?:hat|cap)\b", *_binary("Wearing_Hat")),
        (r"\bearrings?\b", *_binary("Wearing_Earrings")),
        (r"\bnecklace\b", *_binary("Wearing_Necklace")),
        (r"\bbags under\b|\beye bags\b", *_binary("Bags_Under_Eyes")),
        (r"\b(?:teens|teenager|twenties|young)\b", *_binary("Young")),
        (r"\b(?:forties|fifties|sixties|seventies|eighties|nineties|middle-aged|elderly)\b", {"Young": 0}, None),
        (r"\b(?:pale|light)(?: skin\b|-skinned\b)", {"Pale_Skin": 1, "skin_tone": 0}, None),
        (r"\bmedium(?: skin\b|-skinned\b)", {"Pale_Skin": 0, "skin_tone": 1}, None),
        (r"\bdark(?: skin\b|-skinned\b)", {"Pale_Skin": 0, "skin_tone": 2}, None),
    ]
]
_SYNTHETIC = re.compile(r"this (?:man|woman) is (?:not )?smiling\b.* (?:he|she) is in (?:his|her) "
                        r"(?:twenties|fifties), with (?:light|medium|dark) skin\.")
_SYNTHETIC_ABSENT = {"Mouth_Slightly_Open": 0, "Bangs": 0, "No_Beard": 1, "Eyeglasses": 0, "Wearing_Lipstick": 0,
                     "Wearing_Hat": 0, "Wearing_Earrings": 0, "Wearing_Necklace": 0, "Bags_Under_Eyes": 0}


def stated_attributes(caption: str) -> dict[str, int]:
    """The attributes (CelebA names, plus `skin_tone` 0/1/2 = light/medium/dark) a caption states, with their values."""
    text = " ".join(caption.lower().replace("’", "'").split())
    found: dict[str, set[int]] = {"Male": {value for value, words in ((1, _MALE), (0, _FEMALE)) if words.search(text)}}
    for cue, affirmed, negated in _CUES:
        for match in cue.finditer(text):
            clause = _CLAUSE_END.split(text[:match.start()])[-1]
            values = negated if _NEGATION.search(clause) else affirmed
            for name, value in (values or {}).items():
                found.setdefault(name, set()).add(value)
    stated = {name: values.pop() for name, values in found.items() if len(values) == 1}
    if _SYNTHETIC.fullmatch(text):
        stated = {**_SYNTHETIC_ABSENT, **stated}
    return stated


def caption_consistency(probs: Mapping[str, Tensor], captions: Sequence[str]) -> dict:
    """Accuracy of a classifier's argmax on the attributes each caption states.

    probs: {head: class probabilities (or logits) [B, K]}, e.g. `AttributeNet.predict` (binary heads: column 1 =
    present); captions: B strings. Statements without a head and heads without a statement are skipped.
    Returns accuracy (over all stated (caption, attribute) pairs; NaN if none), per_attribute {head: accuracy}
    and count.
    """
    if isinstance(captions, str):
        raise InputError("captions: expected a list of strings, got one string")
    for name, p in probs.items():
        if p.dim() != 2 or len(p) != len(captions):
            raise InputError(f"probs[{name!r}] has shape {tuple(p.shape)}; expected [{len(captions)}, K] for "
                             f"{len(captions)} captions")
    predicted = {name: p.argmax(1).tolist() for name, p in probs.items()}
    hits: dict[str, list[bool]] = {}
    for i, text in enumerate(captions):
        for name, value in stated_attributes(text).items():
            if name in predicted:
                hits.setdefault(name, []).append(predicted[name][i] == value)
    count = sum(len(h) for h in hits.values())
    return {
        "accuracy": sum(sum(h) for h in hits.values()) / count if count else math.nan,
        "per_attribute": {name: sum(hits[name]) / len(hits[name]) for name in probs if name in hits},
        "count": count,
    }
